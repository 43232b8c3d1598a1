"""Load signals: each backend's own Prometheus endpoint, scraped on an interval.

The router counts only the requests it sent; other routers, and clients that bypass it, load the
same servers. So every `interval_s` each backend whose adapter knows a metrics URL is scraped, the
adapter reads its queue depth and KV-cache use from the text (with prometheus-client's parser), and
the values go to the native table (`Router.set_signals`) stamped with the time of the successful
scrape. A failed scrape changes nothing: the last values age, and once older than `max_age_s` the
core ignores them (stale signals are never trusted).

The core adds the reported queue to the router's own cost in flight, so the router's own requests
waiting at the backend must not be in it twice. When the adapter reports the running requests as
well (vLLM, TGI), what goes to the core is the backend's other requests: running + waiting minus
the router's requests in flight there (never below 0). The router's in-flight count includes
requests still on the wire, so the estimate errs towards fewer others, not more. Without a running
count (Triton's pending count) the queue goes in as reported.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Final

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge

from irmiddleware.hooks import LoadSignals
from irmiddleware.proxy._fleet import Backend, Fleet
from irmiddleware.proxy._metrics import remove_backend_series
from irmiddleware.proxy.config import RouterConfig

__all__ = ["SignalScraper"]

log = logging.getLogger("irmiddleware.proxy.signals")

_QUEUE_DEPTH_MAX: Final = 2**32 - 1


@dataclass(frozen=True, slots=True)
class _Reading:
    signals: LoadSignals
    read_at: float
    """`time.monotonic()` when the scrape succeeded (the core's clock)."""
    others: int
    """The requests given to the core: the backend's requests the router did not send."""


class SignalScraper:
    """Scrapes every backend with a metrics URL and feeds what it reports to the native table."""

    def __init__(self, fleet: Fleet, config: RouterConfig, registry: CollectorRegistry) -> None:
        self._fleet = fleet
        self._config = config.signals
        self._targets: dict[int, str] = {}
        for backend in fleet.backends.values():
            self.add(backend)
        self._readings: dict[int, _Reading] = {}
        self._failing: set[int] = set()
        self._queue = Gauge(
            "irm_backend_reported_queue",
            "Queue depth the backend last reported.",
            ["backend"],
            registry=registry,
        )
        self._kv = Gauge(
            "irm_backend_reported_kv_usage",
            "KV-cache use (0-1) the backend last reported.",
            ["backend"],
            registry=registry,
        )
        self._scrapes = Counter(
            "irm_signal_scrapes",
            "Scrapes of backends' metrics, by result (ok, failed).",
            ["backend", "result"],
            registry=registry,
        )

    def add(self, backend: Backend) -> None:
        """Scrapes `backend` too, from the next round on (when it has a metrics URL)."""
        url = backend.metrics_url or backend.adapter.metrics_url(backend.url)
        if self._config.enabled and url is not None:
            self._targets[backend.id] = url

    def remove(self, backend: Backend) -> None:
        """Stops scraping `backend` and drops its series (a scrape under way is discarded)."""
        self._targets.pop(backend.id, None)
        self._readings.pop(backend.id, None)
        self._failing.discard(backend.id)
        for metric, labels in (
            (self._queue, ("backend",)),
            (self._kv, ("backend",)),
            (self._scrapes, ("backend", "result")),
        ):
            remove_backend_series(metric, labels, backend.url)

    @property
    def active(self) -> bool:
        return bool(self._targets)

    async def run(self, client: httpx.AsyncClient) -> None:
        """Scrapes until cancelled. Each round waits for all scrapes, each bounded by `timeout_s`."""
        while True:
            await asyncio.gather(*(self._scrape(client, b, url) for b, url in self._targets.items()))
            await asyncio.sleep(self._config.interval_s)

    async def _scrape(self, client: httpx.AsyncClient, backend_id: int, url: str) -> None:
        backend = self._fleet.backends.get(backend_id)
        if backend is None:
            return  # removed since the round began
        try:
            async with asyncio.timeout(self._config.timeout_s):
                response = await client.get(url, timeout=self._config.timeout_s)
            response.raise_for_status()
            signals = backend.adapter.load_signals(response.text)
            if signals is None:
                raise ValueError("no load metrics in the answer")
        except (httpx.HTTPError, TimeoutError, ValueError) as error:
            self._failed(backend, url, error)
            return
        self._record(backend, signals, time.monotonic())

    def _record(self, backend: Backend, signals: LoadSignals, read_at: float) -> None:
        if self._targets.get(backend.id) is None:
            return  # removed while it was scraped
        queue_depth = max(0, min(int(signals.queue_depth), _QUEUE_DEPTH_MAX))
        kv_usage = max(0.0, min(float(signals.kv_usage), 1.0))
        others = queue_depth
        if signals.running is not None:
            ours = self._fleet.router.accelerator_stats(backend.id).requests_in_flight
            others = max(0, min(queue_depth + max(0, int(signals.running)) - ours, _QUEUE_DEPTH_MAX))
        self._fleet.router.set_signals(backend.id, queue_depth=others, kv_usage=kv_usage, read_at=read_at)
        self._readings[backend.id] = _Reading(signals, read_at, others)
        self._queue.labels(backend.url).set(queue_depth)
        self._kv.labels(backend.url).set(kv_usage)
        self._scrapes.labels(backend.url, "ok").inc()
        if backend.id in self._failing:
            self._failing.discard(backend.id)
            log.info("load signals from %s are back", backend.url)

    def _failed(self, backend: Backend, url: str, error: BaseException) -> None:
        if self._targets.get(backend.id) is None:
            return
        self._scrapes.labels(backend.url, "failed").inc()
        if backend.id not in self._failing:  # log a failing streak once, not every interval
            self._failing.add(backend.id)
            log.warning("cannot read load signals of %s from %s: %r", backend.url, url, error)

    def status_of(self, backend_id: int) -> dict[str, Any] | None:
        """The last reading of a backend for the status document; None when it has none."""
        reading = self._readings.get(backend_id)
        if reading is None:
            return None
        age_s = time.monotonic() - reading.read_at
        return {
            "queue_depth": reading.signals.queue_depth,
            "running": reading.signals.running,
            "others": reading.others,
            "kv_usage": reading.signals.kv_usage,
            "age_s": round(age_s, 3),
            "fresh": age_s <= self._config.max_age_s,
        }
