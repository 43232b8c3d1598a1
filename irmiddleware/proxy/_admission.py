"""Admission control: a priority class per request, bounded waiting for capacity, load shedding and
per-tenant limits. doc/admission.md explains the model; this module implements it.

The flow for one request (`RoutingMiddleware` calls these in order):

1. `Admission.admit` gives the request its class (header, then body `priority`, then the tenant's,
   the route's or the global default), checks the tenant's rate and concurrency limits (429), and
   returns a ticket that gives the tenant's concurrency slot back when the request ends.
2. `Admission.acquire` takes a lease from the fleet at the class's share of capacity; when nothing
   fits, the request waits in `WaitQueue` (bounded in length and time) or is shed with 503:
   `no_capacity` when the backends that are up are full, `no_healthy_backend` when none is up.
   A retry after a failed attempt comes back here too, excluding the backends already tried, and
   may wait until the request's own admission deadline (doc/proxy.md, "Retries").
3. Every release of a lease calls `Admission.released`, which hands the freed capacity to the best
   waiter at once: no polling, and exactly one waiter is woken per freed slot.
4. Capacity that appears without a release (a backend back to active after failed health checks,
   an ejection or a drain; a larger capacity; a backend that joined a pool) reaches
   `Admission.capacity_appeared` through the fleet's `on_capacity`, which serves every waiter
   that now fits at once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final, Generic, NamedTuple, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from irmiddleware._errors import DuplicateBackendError, TableFullError, UnknownBackendError
from irmiddleware._json import loads_body
from irmiddleware._native import CLASSES_COUNT
from irmiddleware._router import Accelerator, Lease
from irmiddleware.hooks import BackendAdapter, RouteInfo
from irmiddleware.proxy._fleet import Fleet
from irmiddleware.proxy._outcomes import Outcome
from irmiddleware.proxy._rates import FleetRates, refill
from irmiddleware.proxy._shared import TENANTS_MAX, ReleaseWatcher, open_router, tenants_table
from irmiddleware.proxy.config import AdmissionConfig, TenantConfig

__all__ = ["SHED_REASONS", "Admission", "FleetTenants", "Shed", "Ticket", "WaitQueue", "Waiter"]

T = TypeVar("T")

log = logging.getLogger("irmiddleware.proxy")

SHED_REASONS: Final = (
    "no_capacity",  # nothing fits and the class may not wait (max_queue 0): 503
    "queue_full",  # the queue (or the class's part of it) is full of requests as urgent: 503
    "evicted",  # a waiter pushed out of a full queue by a more urgent arrival: 503
    "timeout",  # waited the class's max_wait_s: 503
    "over_rate",  # the tenant exceeded its request rate: 429
    "over_concurrency",  # the tenant has max_concurrency requests waiting or in flight: 429
    "no_healthy_backend",  # no backend serving the model is up (an outage, not saturation): 503
)
"""Why a request was refused, the `reason` label of `irm_admission_shed_total`."""

# Body `priority` is part of the OpenAI-compatible protocols vLLM speaks; only vLLM acts on it.
_BODY_PRIORITY_TYPES: Final = frozenset({"vllm", "openai"})
_FORWARD_PRIORITY_TYPES: Final = frozenset({"vllm"})
_TENANTS_TRACKED_MAX: Final = 100_000
_WAIT_BUCKETS_S: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Shed(Exception):
    """The request is refused by admission control; the middleware answers `status` itself."""

    def __init__(
        self, status: int, message: str, outcome: Outcome, reason: str, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.outcome, self.reason = status, message, outcome, reason
        self.retry_after = retry_after
        self.param: str | None = None


# ---- the wait queue ------------------------------------------------------------------------------


class Waiter(Generic[T]):
    """One request waiting for capacity. `future` gets the lease, or None when it was evicted."""

    __slots__ = ("arrival_s", "future", "live", "model", "priority", "route", "seq")

    def __init__(
        self,
        model: str,
        priority: int,
        arrival_s: float,
        seq: int,
        future: asyncio.Future[T | None],
        route: Any = None,
    ) -> None:
        self.model, self.priority, self.arrival_s, self.seq = model, priority, arrival_s, seq
        self.future = future
        self.route = route  # what `try_acquire` needs besides model and class (e.g. affinity)
        self.live = True  # in the queue; removal is lazy (a dead entry is skipped where it is met)


class WaitQueue(Generic[T]):
    """Requests waiting for capacity: one FIFO per (model, class), ordered across classes by
    effective class, then arrival.

    The effective class is the class minus one per `aging_s` waited (never below 0): a waiter
    that has waited long enough is ordered, and admitted, like a more urgent request, which bounds
    how long a steady stream of urgent traffic can starve a lower class. Within a (model, class)
    FIFO the head is the oldest, hence also the most promoted, so comparing heads finds the best
    waiter and comparing tails finds the worst.

    `try_acquire(model, class, route)` reserves capacity for a waiter (a non-blocking call into the
    core); `route` is what the waiter entered with.
    """

    def __init__(
        self,
        config: AdmissionConfig,
        try_acquire: Callable[[str, int, Any], T | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._try_acquire = try_acquire
        self._clock = clock
        self._queues: dict[str, list[collections.deque[Waiter[T]]]] = {}
        self._seq = itertools.count()
        self.waiting = [0] * CLASSES_COUNT
        """Live waiters per class (their class at arrival)."""
        self.total = 0

    def effective(self, waiter: Waiter[T], now: float) -> int:
        aging_s = self._config.aging_s
        if aging_s <= 0:
            return waiter.priority
        return max(0, waiter.priority - int((now - waiter.arrival_s) / aging_s))

    def enter(
        self,
        model: str,
        priority: int,
        future: asyncio.Future[T | None],
        route: Any = None,
        *,
        retry_since_s: float | None = None,
    ) -> Waiter[T]:
        """Queues a request, evicting a less urgent waiter when the queue is full; `Shed` when the
        request may not wait (`no_capacity`) or the queue is full of requests as urgent.

        A retry (`retry_since_s`: when its request was first admitted) goes to the head of its
        class and may exceed the queue's bounds: it held capacity a moment ago and waited its turn
        then, so there are never more of them than the fleet's capacity."""
        limit = self._config.max_queue_of(priority)
        if limit == 0:
            raise _saturated(model, "no_capacity")
        if retry_since_s is not None:
            return self._append(Waiter(model, priority, retry_since_s, next(self._seq), future, route), True)
        if self.waiting[priority] >= limit:
            raise _saturated(model, "queue_full")  # FIFO within a class: the newest goes
        if self.total >= self._config.max_queue:
            victim = self._worst()
            if victim is None or self.effective(victim, self._clock()) <= priority:
                raise _saturated(model, "queue_full")
            self._remove(victim)
            victim.future.set_result(None)
        return self._append(Waiter(model, priority, self._clock(), next(self._seq), future, route), False)

    def _append(self, waiter: Waiter[T], front: bool) -> Waiter[T]:
        queues = self._queues.get(waiter.model)
        if queues is None:
            queues = self._queues[waiter.model] = [collections.deque() for _ in range(CLASSES_COUNT)]
        if front:
            queues[waiter.priority].appendleft(waiter)
        else:
            queues[waiter.priority].append(waiter)
        self.waiting[waiter.priority] += 1
        self.total += 1
        return waiter

    def leave(self, waiter: Waiter[T]) -> None:
        """Takes a waiter out (timed out, disconnected); nothing if it already left."""
        if waiter.live:
            self._remove(waiter)

    def dispatch(self, models: Iterable[str], limit: int | None = None) -> int:
        """Hands capacity to the best waiters for `models`, at most `limit` of them; returns how
        many got a lease. Heads are tried best first; one that does not fit (its class's share is
        used up) lets the next one in, and is tried first again at the next release."""
        handed = 0
        models = tuple(models)
        while (limit is None or handed < limit) and self.total:
            now = self._clock()
            heads = sorted(self._heads(models), key=lambda w: (self.effective(w, now), w.seq))
            for head in heads:
                lease = self._try_acquire(head.model, self.effective(head, now), head.route)
                if lease is not None:
                    self._remove(head)
                    head.future.set_result(lease)
                    handed += 1
                    break
            else:
                return handed
        return handed

    def _heads(self, models: Sequence[str]) -> Iterator[Waiter[T]]:
        for model in models:
            for queue in self._queues.get(model, ()):
                while queue and not self._alive(queue[0]):
                    queue.popleft()
                if queue:
                    yield queue[0]

    def _worst(self) -> Waiter[T] | None:
        """The least urgent waiter (latest arrival among those): the one a full queue evicts."""
        now = self._clock()
        worst: Waiter[T] | None = None
        for queues in self._queues.values():
            for queue in queues:
                while queue and not self._alive(queue[-1]):
                    queue.pop()
                if queue and (worst is None or self._later(queue[-1], worst, now)):
                    worst = queue[-1]
        return worst

    def _later(self, a: Waiter[T], b: Waiter[T], now: float) -> bool:
        return (self.effective(a, now), a.seq) > (self.effective(b, now), b.seq)

    def _alive(self, waiter: Waiter[T]) -> bool:
        # A cancelled future means its task was cancelled and will call `leave` shortly; drop it
        # now so it is neither handed a lease nor counted.
        if waiter.live and waiter.future.done():
            self._remove(waiter)
        return waiter.live

    def _remove(self, waiter: Waiter[T]) -> None:
        waiter.live = False
        self.waiting[waiter.priority] -= 1
        self.total -= 1


def _saturated(model: str, reason: str) -> Shed:
    return Shed(503, f"No backend serving `{model}` has capacity; retry later.", "no_capacity", reason)


class _Want(NamedTuple):
    """What a waiter asks the fleet for: its route, minus the backends it already tried."""

    route: RouteInfo
    exclude: frozenset[int]


# ---- tenants -------------------------------------------------------------------------------------


class _Tenant:
    __slots__ = ("active", "stamp_s", "tokens")

    def __init__(self, tokens: float, now: float) -> None:
        self.active = 0
        self.tokens = tokens
        self.stamp_s = now


class Ticket:
    """Held while a request is admitted (waiting or in flight); leaving it frees the tenant's
    concurrency slot. Use it as a context manager."""

    __slots__ = ("_key", "_lease", "_tenants")

    def __init__(
        self,
        tenants: dict[str, _Tenant] | None = None,
        key: str = "",
        lease: Lease | _Untracked | None = None,
    ) -> None:
        self._tenants, self._key = tenants, key
        self._lease = lease
        """The tenant's fleet-wide slot, on a shared table (`FleetTenants`)."""

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release(ok=True, latency_s=0.0)
        tenants, self._tenants = self._tenants, None
        if tenants is not None:
            state = tenants.get(self._key)
            if state is not None:
                state.active -= 1


_NO_TICKET: Final = Ticket()


class FleetTenants:
    """Tenants' concurrency limits across every process on a shared table: each limited tenant is
    a slot of a second small shared table (`_shared.tenants_table`) whose capacity is its
    `max_concurrency`, and a request holds one unit of it while admitted. The core counts the
    units of all processes at once, and records them per owner like any lease, so a dead
    worker's units come back with its reservations (doc/workers.md)."""

    def __init__(self, table: str) -> None:
        self.router = open_router("round_robin", tenants_table(table), max_accelerators=TENANTS_MAX)
        self._full_logged = False

    def enter(self, key: str, limit: int) -> Lease | _Untracked | None:
        """One unit of `key`'s slot (added at `limit` by the first process that meets it), or None
        when the tenant holds `limit` already. When the table is full, the unit is granted
        (the process's own count still applies) and a warning is logged once."""
        tenant_id = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=7).digest(), "big")
        try:
            return self.router.acquire_on(tenant_id)
        except UnknownBackendError:
            pass
        try:
            self.router.add_accelerator(Accelerator(tenant_id, limit))
        except DuplicateBackendError:
            pass  # another process met the tenant first
        except TableFullError:
            if not self._full_logged:
                self._full_logged = True
                log.warning("the fleet-wide tenants table is full: new tenants are limited per process")
            return _UNTRACKED
        return self.router.acquire_on(tenant_id)

    def close(self) -> None:
        self.router.close()


class _Untracked:
    """A tenant unit granted without a slot (the tenants table is full)."""

    def release(self, ok: bool = True, latency_s: float | None = None) -> None:
        pass


_UNTRACKED: Final = _Untracked()


# ---- admission -----------------------------------------------------------------------------------


class Admission:
    """Classes, limits and waiting for one router; see the module docstring."""

    def __init__(
        self,
        config: AdmissionConfig,
        fleet: Fleet,
        registry: CollectorRegistry,
        retry_after_s: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        outage_retry_after_s: int | None = None,
    ) -> None:
        self.config = config
        self._fleet = fleet
        self._clock = clock
        self._retry_after_s = retry_after_s
        self._outage_retry_after_s = retry_after_s if outage_retry_after_s is None else outage_retry_after_s
        self._header = config.header.encode("latin-1")
        self._tenant_header = config.tenant_header.encode("latin-1")
        self._tenants: dict[str, _Tenant] = {}
        limits_on = config.tenant_defaults.limited or any(t.limited for t in config.tenants.values())
        # Without limits or per-tenant classes the tenant header is not even looked at.
        self._tenants_on = limits_on or bool(config.tenants)
        self.queue: WaitQueue[Lease] = WaitQueue(config, self._try_acquire, clock)
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop the waiters' futures belong to (set when the first request waits)."""
        # On a shared table other processes release too, and their tenants count against ours.
        shared = fleet.shared_table
        self.fleet_tenants = FleetTenants(shared) if shared is not None and limits_on else None
        rates_on = any(t.rate_per_s > 0 for t in (config.tenant_defaults, *config.tenants.values()))
        self.fleet_rates = FleetRates(shared) if shared is not None and rates_on else None
        self._watcher = (
            ReleaseWatcher(fleet.router, self.kick, lambda: self.queue.total > 0)
            if shared is not None
            else None
        )
        """On a shared table: wakes the waiters when another process releases (`_shared`)."""
        self._metrics(registry)

    def _metrics(self, registry: CollectorRegistry) -> None:
        self._wait_s = Histogram(
            "irm_admission_wait_seconds",
            "Time requests spent waiting for capacity, by class (whatever ended the wait).",
            ["class"],
            buckets=_WAIT_BUCKETS_S,
            registry=registry,
        )
        admitted = Counter(
            "irm_admission_admitted",
            "Requests given capacity, by class and whether they waited (wait: none, queued).",
            ["class", "wait"],
            registry=registry,
        )
        self._admitted = [
            (admitted.labels(str(c), "none"), admitted.labels(str(c), "queued")) for c in _classes()
        ]
        self._shed = Counter(
            "irm_admission_shed",
            "Requests refused by admission control, by class and reason.",
            ["class", "reason"],
            registry=registry,
        )
        self._abandoned = Counter(
            "irm_admission_abandoned",
            "Waiting requests whose client went away, by class.",
            ["class"],
            registry=registry,
        )
        registry.register(_QueueCollector(self.queue))

    # ---- 1. classify and limit ---------------------------------------------------------------

    def admit(
        self, headers: Iterable[tuple[bytes, bytes]], adapter: BackendAdapter, route: RouteInfo, body: bytes
    ) -> tuple[RouteInfo, bytes, Ticket]:
        """The request's route with its class, its body (with `priority` when forwarded) and its
        ticket. `Shed` (429) when its tenant is over a limit, 400 for a malformed class header."""
        named, tenant = self._read_headers(headers)
        limits = self.config.tenants.get(tenant, self.config.tenant_defaults) if tenant else None
        priority = named
        if priority is None and self.config.body_priority and adapter.type_name in _BODY_PRIORITY_TYPES:
            priority = _body_priority(body)
        if priority is None:
            priority = self._default_class(route.path, limits)
        if self.config.forward_priority and adapter.type_name in _FORWARD_PRIORITY_TYPES:
            body = _with_priority(body, priority)
        if priority != route.priority:
            # Built directly: dataclasses.replace costs ~4 us per request (it inspects the fields).
            route = RouteInfo(
                route.path,
                route.model,
                cost=route.cost,
                priority=priority,
                session_key=route.session_key,
                prompt=route.prompt,
            )
        if tenant is None or limits is None or not limits.limited:
            return route, body, _NO_TICKET
        return route, body, self._enter_tenant(tenant, limits, priority)

    def _read_headers(self, headers: Iterable[tuple[bytes, bytes]]) -> tuple[int | None, str | None]:
        named: int | None = None
        tenant: str | None = None
        for name, value in headers:
            if name == self._header:
                named = _header_class(value, self.config.header)
            elif name == self._tenant_header and self._tenants_on:
                tenant = _tenant_key(value)
        return named, tenant

    def _default_class(self, path: str, limits: TenantConfig | None) -> int:
        if limits is not None and limits.default_class is not None:
            return limits.default_class
        return self.config.routes.get(path, self.config.default_class)

    def _enter_tenant(self, key: str, limits: TenantConfig, priority: int) -> Ticket:
        now = self._clock()
        state = self._tenants.get(key)
        if state is None:
            if len(self._tenants) >= _TENANTS_TRACKED_MAX:
                self._forget_idle_tenants()
            state = self._tenants[key] = _Tenant(limits.bucket_size, now)
        lease = None
        if limits.max_concurrency and state.active >= limits.max_concurrency:
            raise self._over_concurrency(priority, limits.max_concurrency)
        if limits.max_concurrency and self.fleet_tenants is not None:
            lease = self.fleet_tenants.enter(key, limits.max_concurrency)
            if lease is None:
                raise self._over_concurrency(priority, limits.max_concurrency)
        try:
            self._take_token(key, state, limits, priority, now)
        except Shed:
            if lease is not None:
                lease.release(ok=True, latency_s=0.0)
            raise
        state.active += 1
        return Ticket(self._tenants, key, lease)

    def _over_concurrency(self, priority: int, limit: int) -> Shed:
        self._count_shed(priority, "over_concurrency")
        return Shed(
            429,
            f"Too many concurrent requests for this API key (limit {limit}).",
            "over_limit",
            "over_concurrency",
            self._retry_after_s,
        )

    def _take_token(self, key: str, state: _Tenant, limits: TenantConfig, priority: int, now: float) -> None:
        if limits.rate_per_s <= 0:
            return
        rate, burst = limits.rate_per_s, limits.bucket_size
        # On a shared table, one bucket for every process (`_rates`); else this process's.
        tokens = None if self.fleet_rates is None else self.fleet_rates.take(key, rate, burst, now)
        if tokens is None:
            tokens = state.tokens = refill(state.tokens, state.stamp_s, now, rate, burst)
            state.stamp_s = now
            state.tokens -= 1 if tokens >= 1 else 0
        if tokens < 1:
            self._count_shed(priority, "over_rate")
            retry_after = max(1, math.ceil((1 - tokens) / rate))
            message = f"Rate limit of {rate:g} requests/s exceeded for this API key."
            raise Shed(429, message, "over_limit", "over_rate", retry_after)

    def _forget_idle_tenants(self) -> None:
        # Bounded memory under many distinct keys: idle tenants restart with a full bucket.
        for key in [key for key, state in self._tenants.items() if state.active == 0]:
            del self._tenants[key]

    # ---- 2. capacity, waiting if need be ------------------------------------------------------

    def deadline(self, route: RouteInfo) -> float:
        """When the admission of a request arriving now ends: its class's `max_wait_s` from now.
        Its retries wait for capacity until then, never longer (`acquire(..., deadline=)`)."""
        return self._clock() + self.config.max_wait_of(route.priority)

    async def acquire(
        self, route: RouteInfo, *, exclude: frozenset[int] = frozenset(), deadline: float | None = None
    ) -> Lease | None:
        """A lease for `route` at its class's share, waiting in the queue when nothing fits;
        `Shed` (503) when it may not wait, the queue is full, it was evicted, it timed out
        (`no_capacity`), or no backend serving the model is up (`no_healthy_backend`).

        A retry names the backends already tried (`exclude`, never chosen again) and the
        request's admission `deadline`; it returns None when no backend it may use is up."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()  # for `capacity_appeared` from other threads
        if self.queue.total and not exclude:
            # Capacity can also appear without a release (a backend coming back, a larger
            # capacity): waiters take it before this newcomer may.
            self.queue.dispatch((route.model,))
        lease = self._fleet.acquire(route, exclude)
        if lease is not None:
            if not exclude:
                self._admitted[route.priority][0].inc()
            return lease
        if (
            exclude
            and not self._fleet.any_active(route.model, exclude)
            and self._fleet.any_active(route.model)
        ):
            return None  # the backends that are up were all tried
        # Nothing fits: the request waits if its class may, even through an outage (a backend
        # back within `max_wait_s` serves it); the answer at the end says which it was.
        timeout_s = self.config.max_wait_of(route.priority)
        since_s = None
        if exclude:
            now = self._clock()
            since_s = now - timeout_s if deadline is None else deadline - timeout_s
            timeout_s = 0.0 if deadline is None else deadline - now
        loop = asyncio.get_running_loop()
        try:
            if timeout_s <= 0:
                raise _saturated(route.model, "timeout")
            waiter = self.queue.enter(
                route.model,
                route.priority,
                loop.create_future(),
                _Want(route, exclude),
                retry_since_s=since_s,
            )
        except Shed as shed:
            raise self._refused(route, shed.reason) from None
        if self._watcher is not None:
            # Room another process frees: the core's release generation moves (a release, a
            # capacity or a state change in any process), and the watcher serves the waiters that
            # now fit. This process's own releases are handed over at once (`released`).
            self._watcher.ensure(loop)
        return await self._wait(waiter, timeout_s, counted=not exclude)

    def can_retry(self, route: RouteInfo, exclude: frozenset[int]) -> bool:
        """Whether a retry of `route` on a backend not in `exclude` could be served: one has room
        now, or one is up and the request's class may wait for it."""
        if self.config.max_queue_of(route.priority) > 0:
            return self._fleet.any_active(route.model, exclude)
        return self._fleet.has_other(route, exclude)

    def _refused(self, route: RouteInfo, reason: str) -> Shed:
        """The 503 for a request nothing could take, counted: `no_healthy_backend` when no backend
        serving its model is up (an outage, whatever the queue did), else `reason` (saturation)."""
        if not self._fleet.any_active(route.model):
            self._count_shed(route.priority, "no_healthy_backend")
            return self._outage(route.model)
        self._count_shed(route.priority, reason)
        return _saturated(route.model, reason)

    def _outage(self, model: str) -> Shed:
        return Shed(
            503,
            f"No backend serving `{model}` is up (all are failing health checks, ejected or drained); "
            "retry later.",
            "no_healthy_backend",
            "no_healthy_backend",
            self._outage_retry_after_s,
        )

    async def _wait(self, waiter: Waiter[Lease], timeout_s: float, counted: bool) -> Lease:
        future, priority = waiter.future, waiter.priority
        entered_s = self._clock()  # a retry's `arrival_s` is its request's, earlier
        try:
            async with asyncio.timeout(timeout_s):
                await future
        except TimeoutError:
            pass  # The future may still have been served at the deadline: checked below.
        except asyncio.CancelledError:
            # The client went away (or the server shuts down). A lease handed over in the same
            # instant is passed on to the next waiter instead of leaking.
            self._abandoned.labels(str(priority)).inc()
            if future.done() and not future.cancelled() and (lease := future.result()) is not None:
                lease.release(ok=True, latency_s=0.0)
                self.released(lease.accelerator_id)
            raise
        finally:
            self.queue.leave(waiter)
            self._wait_s.labels(str(priority)).observe(self._clock() - entered_s)
        lease = future.result() if future.done() and not future.cancelled() else None
        if lease is None:
            reason = "timeout" if not future.done() or future.cancelled() else "evicted"
            assert isinstance(waiter.route, _Want)
            raise self._refused(waiter.route.route, reason)
        if counted:
            self._admitted[priority][1].inc()
        return lease

    def _try_acquire(self, model: str, priority: int, want: _Want | None) -> Lease | None:
        # The waiter's own route (its cost, session key, prompt) at the class it has aged to.
        if want is None:
            return self._fleet.acquire(RouteInfo("", model, 1, priority))
        return self._fleet.acquire(dataclasses.replace(want.route, priority=priority), want.exclude)

    # ---- 3. releases ----------------------------------------------------------------------------

    def released(self, backend_id: int) -> None:
        """A lease on `backend_id` ended: its slot goes to the best waiter that can use it."""
        if self.queue.total:
            backend = self._fleet.backends.get(backend_id)
            if backend is not None:
                self.queue.dispatch(backend.models, limit=1)

    def kick(self) -> int:
        """Hands any free capacity to waiters, for every model, now; call it on the event loop's
        thread when capacity appears without a release. Returns how many got in."""
        return self.queue.dispatch(self._fleet.models)

    def capacity_appeared(self) -> None:
        """Capacity may have appeared without a release (the fleet's `on_capacity` listener):
        waiters that now fit are served at once. Safe from any thread: off the loop's thread, the
        hand-over is scheduled on the loop (the waiters' futures belong to it)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # no request has been admitted yet: nobody waits
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            if self.queue.total:
                self.kick()
        else:
            # Scheduled even if the queue looks empty from here: a request on the loop may be
            # between finding no capacity and entering the queue.
            loop.call_soon_threadsafe(self.kick)

    def close(self) -> None:
        """Stops the release watcher and frees the fleet-wide tenants table and rates (a shared
        table's), if any; idempotent. Before the fleet's router closes."""
        if self._watcher is not None:
            self._watcher.close()
        if self.fleet_tenants is not None:
            self.fleet_tenants.close()
        if self.fleet_rates is not None:
            self.fleet_rates.close()

    # ---- observation ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {"waiting": self.queue.total, "waiting_by_class": list(self.queue.waiting)}

    def _count_shed(self, priority: int, reason: str) -> None:
        self._shed.labels(str(priority), reason).inc()


class _QueueCollector(Collector):
    """`irm_admission_queue_length{class}`, read from the queue at scrape time (no per-request cost)."""

    def __init__(self, queue: WaitQueue[Any]) -> None:
        self._queue = queue

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "irm_admission_queue_length", "Requests waiting for capacity, by class.", labels=["class"]
        )
        for priority, count in enumerate(self._queue.waiting):
            gauge.add_metric([str(priority)], count)
        yield gauge


def _classes() -> range:
    return range(CLASSES_COUNT)


def _header_class(value: bytes, header: str) -> int:
    if value.isdigit() and int(value) < CLASSES_COUNT:
        return int(value)
    shed = Shed(400, f"Header `{header}` must be a class 0..{CLASSES_COUNT - 1}.", "rejected", "bad_class")
    shed.param = header
    raise shed


def _tenant_key(value: bytes) -> str:
    key = value.decode("latin-1").strip()
    if key[:7].lower() == "bearer ":
        return key[7:].strip()
    return key


def _body_priority(body: bytes) -> int | None:
    """vLLM's `priority` (an int, lower runs earlier) clamped to a class; None when absent."""
    if b'"priority"' not in body:  # Most bodies have none: skip a second JSON parse.
        return None
    try:
        value = loads_body(body).get("priority")
    except (ValueError, AttributeError):
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        return None  # The backend answers its own 400 for a malformed field.
    return min(max(value, 0), CLASSES_COUNT - 1)


def _with_priority(body: bytes, priority: int) -> bytes:
    parsed = loads_body(body)
    if parsed.get("priority") == priority:
        return body
    parsed["priority"] = priority
    return json.dumps(parsed).encode()
