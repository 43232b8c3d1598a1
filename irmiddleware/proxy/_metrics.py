"""The router's Prometheus metrics, in a `CollectorRegistry` of its own (several routers, or a
router inside an app with its own metrics, can share a process).

Per-backend load is read from the native core at scrape time instead of being counted again here:
the core's counters are the truth, and a scrape-time read costs nothing per request.

Every label value comes from the configuration or from the router itself (backend URLs, models
the fleet serves, the fixed outcomes and status classes), never from what a client sends: a
request naming an unknown model counts under `model="none"`, so clients cannot grow the page.

The per-request histogram observations (three per request) are held in plain Python, bucket
counts under one lock instead of prometheus-client's two locks and its Python loop over the
bounds, and handed to the metric objects in bulk whenever the registry is collected (`_Held`):
every export sees every request observed before it. With several processes
(`enable_multiprocess`) each observation goes to the shared files at once, since another process
exports them.

The export (`exposition`) leaves out prometheus-client's `_created` series (one extra series per
counter and histogram child, holding a creation timestamp nobody graphs). The library's switch for
that is process-wide (`disable_created_metrics`) and would change the metrics of an app the router
is dropped into; filtering the router's own registry at export time changes nothing else.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, NamedTuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from irmiddleware._router import AcceleratorStats
from irmiddleware.proxy._outcomes import AttemptOutcome, Outcome

__all__ = [
    "MULTIPROCESS_ENV",
    "BackendMetrics",
    "RouterMetrics",
    "enable_multiprocess",
    "mark_process_dead",
    "remove_backend_series",
    "status_class",
]

MULTIPROCESS_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus-client's variable: the directory where every process of a router writes its values."""

# Latency buckets from 5 ms to 10 min: LLM answers span four orders of magnitude.
_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _BackendCollector(Collector):
    """Exports the core's per-backend counters at scrape time."""

    def __init__(self, stats: Callable[[], Sequence[tuple[str, AcceleratorStats]]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "irm_backend_in_flight", "Requests in flight per backend.", labels=["backend"]
        )
        load = GaugeMetricFamily("irm_backend_load", "Cost units in flight per backend.", labels=["backend"])
        capacity = GaugeMetricFamily(
            "irm_backend_capacity", "Cost units a backend may hold.", labels=["backend"]
        )
        up = GaugeMetricFamily(
            "irm_backend_active", "1 if the backend takes new requests.", labels=["backend"]
        )
        for url, stats in self._stats():
            in_flight.add_metric([url], stats.requests_in_flight)
            load.add_metric([url], stats.load)
            capacity.add_metric([url], stats.capacity)
            up.add_metric([url], 1.0 if stats.state == "active" else 0.0)
        yield from (in_flight, load, capacity, up)


class _WithoutCreated(Collector):
    """A registry's metrics without their `_created` samples (module docstring)."""

    def __init__(self, registry: Collector) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        # `collect` builds fresh `Metric` objects on every call: trimming them changes nothing kept.
        for metric in self._registry.collect():
            created = metric.name + "_created"
            metric.samples = [sample for sample in metric.samples if sample.name != created]
            yield metric


def remove_backend_series(metric: MetricWrapperBase, labels: Sequence[str], backend_url: str) -> None:
    """Removes every child of `metric` (labelled `labels`, in order) whose `backend` label is
    `backend_url`: a backend that left the fleet leaves no series behind (its URL may have been a
    pod's address, never to come back). The children are found in what the metric exports, so
    this works whatever other labels they have. Not in multiprocess mode (workers): there the
    values are in the processes' files, which prometheus-client cannot remove series from, and a
    removed backend's series stay until the router restarts."""
    if MULTIPROCESS_ENV in os.environ:
        return
    found = {
        tuple(sample.labels[name] for name in labels)
        for family in metric.collect()
        for sample in family.samples
        if sample.labels.get("backend") == backend_url
    }
    for values in found:
        with contextlib.suppress(KeyError):  # removed meanwhile
            metric.remove(*values)


class _WithWorkers(Collector):
    """The router's metrics summed over its processes (`enable_multiprocess`): the counters,
    histograms and gauges every process writes to the directory, plus what only this process's
    registry holds (the core's per-backend load, read from the shared table, and this process's
    own CPU and memory)."""

    def __init__(self, registry: CollectorRegistry, directory: str) -> None:
        self._registry, self._directory = registry, directory

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.multiprocess import MultiProcessCollector

        everyone = MultiProcessCollector(None, self._directory)  # type: ignore[no-untyped-call]
        merged = {metric.name: metric for metric in everyone.collect()}  # type: ignore[no-untyped-call]
        for metric in self._registry.collect():
            # This process's own values are in the directory too: counted there, once.
            if metric.name not in merged:
                yield metric
        yield from merged.values()


def enable_multiprocess(directory: str) -> None:
    """Makes every metric this process creates from now on, and every process started from it
    with its environment, write its values to `directory`, so that any of them exports the sum
    (prometheus-client's multiprocess mode). `irmiddleware serve --workers N` calls it in its
    supervisor, with a directory of its own run. Gauges keep one series per process (a `pid`
    label): a dead worker's are removed with `mark_process_dead`."""
    from prometheus_client import values

    os.environ[MULTIPROCESS_ENV] = directory
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def mark_process_dead(pid: int, directory: str) -> None:
    """Drops a dead process's live gauges from the multiprocess `directory` (its counters stay:
    they are part of the totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


_STATUS_CLASSES: Final = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


def status_class(status: int | None) -> str:
    """The `status_class` label of an answer's status: "2xx" ... "5xx", or "none" when the client
    got no status (it went away first)."""
    return "none" if status is None else _STATUS_CLASSES.get(status // 100, "none")


class _HeldHistogram:
    """One histogram child's observations since the last collection: counts per bucket and their
    sum, handed to the child in bulk by `_Held.flush` (same buckets, same `le` semantics: a
    value goes to the first bucket whose bound it does not exceed)."""

    __slots__ = ("backend", "bounds", "child", "counts", "lock", "observed", "total")

    def __init__(self, child: Any, backend: str, lock: threading.Lock) -> None:
        self.child, self.backend, self.lock = child, backend, lock
        self.bounds: list[float] = child._upper_bounds
        self.counts = [0] * len(self.bounds)
        self.observed = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        with self.lock:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.observed += 1
            self.total += value

    def flush(self) -> None:
        """Into the child (the caller holds the lock)."""
        if not self.observed:
            return
        for index, count in enumerate(self.counts):
            if count:
                self.child._buckets[index].inc(count)
                self.counts[index] = 0
        self.child._sum.inc(self.total)
        self.observed, self.total = 0, 0.0


class _Held(Collector):
    """The per-request histogram observations held between collections (module docstring). Registered first in
    the router's registry, so collecting it (an export, or any other reader) flushes them into the
    metric objects before those are read; it yields no metric of its own."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.histograms: list[_HeldHistogram] = []

    def histogram(self, child: Any, backend: str) -> _HeldHistogram:
        held = _HeldHistogram(child, backend, self.lock)
        with self.lock:
            self.histograms.append(held)
        return held

    def flush(self, forget: str | None = None) -> None:
        """Hands everything held to the metric objects; `forget` drops that backend's histograms."""
        with self.lock:
            for held in self.histograms:
                held.flush()
            if forget is not None:
                self.histograms = [held for held in self.histograms if held.backend != forget]

    def collect(self) -> Iterator[Metric]:
        self.flush()
        return iter(())


def _holds(histogram: Histogram) -> bool:
    """Whether this prometheus-client keeps a histogram child's buckets where `_HeldHistogram`
    hands them over (it has for years; otherwise every update goes straight to the child)."""
    child = histogram.labels("probe")
    held = all(hasattr(child, name) for name in ("_upper_bounds", "_buckets", "_sum"))
    histogram.remove("probe")
    return held


class BackendMetrics(NamedTuple):
    """One backend's histogram children (`RouterMetrics.of`)."""

    latency: Any
    ttfb: Any
    first_byte: Any
    """`irm_request_ttfb_seconds`: from the request's arrival to its response headers."""


class RouterMetrics:
    """The metric objects the middleware updates, and the registry `/metrics` exports.

    The per-request updates go through `of` (whose histograms hold their observations until the
    next collection, module docstring) and `count`, which keep the labelled children in plain
    dicts: prometheus-client's `labels()` takes a lock and checks the labels on every call,
    a few microseconds each, four times per request. Both caches are bounded: the label values
    are configured backend URLs (plus "none"), served models (plus "none"), the fixed `Outcome`
    values and the status classes.
    """

    def __init__(self, stats: Callable[[], Sequence[tuple[str, AcceleratorStats]]]) -> None:
        self.registry = CollectorRegistry()
        directory = os.environ.get(MULTIPROCESS_ENV)
        # First in the registry: every collection flushes the held updates before reading.
        self._held: _Held | None = None if directory else _Held()
        if self._held is not None:
            self.registry.register(self._held)
        self.requests = Counter(
            "irm_requests",
            "Requests handled by the router, by the backend that served them, the model they asked "
            "for, their final outcome and the class of the status the client got.",
            ["backend", "model", "outcome", "status_class"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "irm_upstream_latency_seconds",
            "From sending to a backend to the end of its relayed answer.",
            ["backend"],
            buckets=_BUCKETS_S,
            registry=self.registry,
        )
        self.ttfb = Histogram(
            "irm_upstream_ttfb_seconds",
            "From sending to a backend to its response headers.",
            ["backend"],
            buckets=_BUCKETS_S,
            registry=self.registry,
        )
        self.first_byte = Histogram(
            "irm_request_ttfb_seconds",
            "From a request's arrival at the router to its response headers going to the client "
            "(admission wait, retries and the backend's own time to first byte), by the backend "
            "that answered.",
            ["backend"],
            buckets=_BUCKETS_S,
            registry=self.registry,
        )
        self.decisions = Counter(
            "irm_routing_decisions",
            "Routing decisions by strategy and result (routed, no_capacity, fallback, retry).",
            ["strategy", "result"],
            registry=self.registry,
        )
        self.affinity = Counter(
            "irm_affinity_decisions",
            "Cache-aware decisions by strategy and outcome: hit (the affine backend took it), miss "
            "(nothing remembered) or overload (the affine backend was over its bounded load).",
            ["strategy", "outcome"],
            registry=self.registry,
        )
        self.retries = Counter(
            "irm_retries",
            "Retries (another backend took the request after an attempt failed), by the backend that "
            "failed and how its attempt ended (connect_error, upstream_error, overloaded).",
            ["backend", "reason"],
            registry=self.registry,
        )
        self.edge_refusals = Counter(
            "irm_edge_refusals",
            "Client connections `irmiddleware serve` ended itself before routing, by reason "
            "(head_too_large, too_many_headers, head_timeout, body_timeout, too_many_connections).",
            ["reason"],
            registry=self.registry,
        )
        self.registry.register(_BackendCollector(stats))
        # The process's CPU, memory, file descriptors, Python version and garbage collections, in
        # the router's own registry (the default registry is the host app's business).
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        if self._held is not None and not _holds(self.latency):
            self.registry.unregister(self._held)
            self._held = None
        own: Collector = self.registry if not directory else _WithWorkers(self.registry, directory)
        self._export = _WithoutCreated(own)
        self._of: dict[str, BackendMetrics] = {}
        self._counted: dict[tuple[str, str, Outcome, str], Any] = {}

    def exposition(self) -> bytes:
        """The Prometheus text page of the router's registry, without `_created` series."""
        return generate_latest(self._export)

    def of(self, backend_url: str) -> BackendMetrics:
        """The latency and time-to-first-byte histograms of one backend."""
        found = self._of.get(backend_url)
        if found is None:
            children: tuple[Any, ...] = (
                self.latency.labels(backend_url),
                self.ttfb.labels(backend_url),
                self.first_byte.labels(backend_url),
            )
            held = self._held
            if held is not None:
                children = tuple(held.histogram(child, backend_url) for child in children)
            found = self._of[backend_url] = BackendMetrics(*children)
        return found

    def retried(self, backend_url: str, reason: AttemptOutcome) -> None:
        """Counts one retry in `irm_retries_total` (rare: no cache)."""
        self.retries.labels(backend_url, reason).inc()

    def forget(self, backend_url: str) -> None:
        """Drops the series of a backend that left the fleet (and the cached children that would
        bring them back)."""
        if self._held is not None:
            self._held.flush(forget=backend_url)
        self._of.pop(backend_url, None)
        self._counted = {key: child for key, child in self._counted.items() if key[0] != backend_url}
        for metric, labels in (
            (self.requests, ("backend", "model", "outcome", "status_class")),
            (self.latency, ("backend",)),
            (self.ttfb, ("backend",)),
            (self.first_byte, ("backend",)),
            (self.retries, ("backend", "reason")),
        ):
            remove_backend_series(metric, labels, backend_url)

    def count(self, backend_url: str, model: str, outcome: Outcome, status: int | None) -> None:
        """Counts one finished request in `irm_requests_total`. `model` must be a model the fleet
        serves, or "none" (the caller checks: label values never come from a client)."""
        key = (backend_url, model, outcome, status_class(status))
        child = self._counted.get(key)
        if child is None:
            child = self._counted[key] = self.requests.labels(*key)
        child.inc()
