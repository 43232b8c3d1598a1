"""The fleet's health: active checks, passive outlier ejection, and the native state they decide.

`FleetHealth` is the one place that sets a backend's native state ("active" / "down"):
- active checks probe each backend (the adapter's health path, or a plugin's `irm_health_probe`)
  every `interval_s`, each bounded by `timeout_s`; `unhealthy_threshold` consecutive failures take
  a backend out, `healthy_threshold` consecutive passes bring it back. A refused connection is a
  failure like any other: a backend still loading is simply not ready. With `require_ready`, a
  backend gets no traffic before its first passing check.
- passive ejections come from `OutlierDetector`, fed by every attempt the proxy makes. An ejected
  backend is re-admitted once its cool-down is over *and* a health check made after that passes.
- panic threshold: when ejections would leave fewer than `min_eligible_share` of a pool's backends
  eligible, that pool's healthy backends are all routed to, ejected or not (some traffic to a
  doubtful backend beats none at all). Health checks are never overridden: a backend that fails
  them is down whatever the share.

`FleetMonitor` runs the checks and the load-signal scraper as asyncio tasks in the middleware's
lifespan, with an httpx client of their own so probes never queue behind user traffic. Each
backend's check is a task of its own: a backend that hangs until `timeout_s` delays nobody else's
check, and the client's pool has no connection bound, so a fleet grown by the admin API, SIGHUP or
discovery never makes one probe wait for another's connection (what is in flight is bounded by the
fleet itself: one check, one scrape and one model discovery per backend at most).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

import httpx
import pluggy
from prometheus_client import CollectorRegistry, Counter, Gauge

from irmiddleware import _plugins
from irmiddleware.hooks import HealthProbe
from irmiddleware.proxy._fleet import Backend, Fleet
from irmiddleware.proxy._metrics import remove_backend_series
from irmiddleware.proxy._outcomes import AttemptOutcome
from irmiddleware.proxy._tls import tls_context
from irmiddleware.proxy.config import RouterConfig
from irmiddleware.proxy.control._outlier import OutlierDetector
from irmiddleware.proxy.control._signals import SignalScraper

__all__ = ["FleetHealth", "FleetMonitor"]

log = logging.getLogger("irmiddleware.proxy.health")

_SLEEP_MIN_S: Final = 0.005


@dataclass(slots=True)
class _Checks:
    """One backend's active-check record."""

    probe: HealthProbe
    healthy: bool
    ever_passed: bool = False
    passes: int = 0
    failures: int = 0
    next_at: float = 0.0
    last_at: float = 0.0


class _HealthMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.healthy = Gauge(
            "irm_backend_healthy",
            "1 if the backend passes its health checks.",
            ["backend"],
            registry=registry,
        )
        self.transitions = Counter(
            "irm_backend_state_transitions",
            "Changes of a backend's routing state, by the state entered (active, down, draining).",
            ["backend", "state"],
            registry=registry,
        )
        self.checks = Counter(
            "irm_health_checks",
            "Active health checks by result (pass, fail).",
            ["backend", "result"],
            registry=registry,
        )
        self.ejections = Counter(
            "irm_outlier_ejections",
            "Passive ejections by reason (connect, 5xx, upstream, timeout, overload).",
            ["backend", "reason"],
            registry=registry,
        )
        self.ejected = Gauge(
            "irm_outlier_ejected",
            "1 while the backend is ejected (cool-down not over or not re-checked).",
            ["backend"],
            registry=registry,
        )
        self.panic = Gauge(
            "irm_outlier_panic_pools",
            "Pools routing to ejected backends (panic threshold reached).",
            registry=registry,
        )


class FleetHealth:
    """Active-check records, the outlier detector, and the native state they imply."""

    def __init__(
        self, fleet: Fleet, config: RouterConfig, manager: pluggy.PluginManager, registry: CollectorRegistry
    ) -> None:
        self.fleet = fleet
        self.config = config.health
        self.outliers = OutlierDetector(config.outliers, list(fleet.backends))
        self._metrics = _HealthMetrics(registry)
        self._manager = manager
        self._state_observers = _plugins.HookCalls.of(manager, "irm_backend_state_changed")
        start_healthy = not (self.config.enabled and self.config.require_ready)
        probes = _plugins.HookCalls.of(manager, "irm_health_probe")
        self._checks = {
            b.id: _Checks(self._probe_of(probes, b), healthy=start_healthy) for b in fleet.backends.values()
        }
        # The starting state is set silently: it is configuration, not a change to report.
        initial = "active" if start_healthy else "down"
        self._states = dict.fromkeys(fleet.backends, initial)
        self._panic_pools: set[str] = set()
        for backend in fleet.backends.values():
            fleet.set_state(backend.id, initial)
            self._metrics.healthy.labels(backend.url).set(1 if start_healthy else 0)
            self._metrics.ejected.labels(backend.url).set(0)

    # ---- backends added and removed while routing goes on (on the event loop) ------------------

    def add(self, backend: Backend, healthy: bool) -> str:
        """Keeps records for a backend about to join the fleet, whose first check gave `healthy`;
        returns the state it starts in."""
        probes = _plugins.HookCalls.of(self._manager, "irm_health_probe")
        checks = _Checks(self._probe_of(probes, backend), healthy=healthy, ever_passed=healthy)
        checks.next_at = time.monotonic() + self.config.interval_s
        self._checks[backend.id] = checks
        self.outliers.add(backend.id)
        state = "active" if healthy else "down"
        self._states[backend.id] = state
        self._metrics.healthy.labels(backend.url).set(1 if healthy else 0)
        self._metrics.ejected.labels(backend.url).set(0)
        return state

    def remove(self, backend: Backend) -> None:
        """Forgets a backend that left the fleet, and its series."""
        self._checks.pop(backend.id, None)
        self._states.pop(backend.id, None)
        self.outliers.remove(backend.id)
        metrics = self._metrics
        for metric, labels in (
            (metrics.healthy, ("backend",)),
            (metrics.ejected, ("backend",)),
            (metrics.transitions, ("backend", "state")),
            (metrics.checks, ("backend", "result")),
            (metrics.ejections, ("backend", "reason")),
        ):
            remove_backend_series(metric, labels, backend.url)

    async def probe(self, client: httpx.AsyncClient, backend: Backend) -> bool:
        """One health check of a backend not yet in the fleet (its plugin probe, if any); True
        when it passes, or when active checks are off."""
        if not self.config.enabled:
            return True
        probes = _plugins.HookCalls.of(self._manager, "irm_health_probe")
        return await _probe(client, backend.url, self._probe_of(probes, backend))

    def _probe_of(self, probes: _plugins.HookCalls | None, backend: Backend) -> HealthProbe:
        default = HealthProbe(backend.adapter.health_path, timeout_s=self.config.timeout_s)
        # A plugin that raises is logged and the next one is asked: a plugin's bug must not take
        # health checking (or another plugin's probe) down.
        probe = probes.first(backend=backend.info, adapter=backend.adapter) if probes else None
        return probe if isinstance(probe, HealthProbe) else default

    # ---- passive: every attempt of live traffic -------------------------------------------------

    def observe(self, backend: Backend, outcome: AttemptOutcome, status: int | None) -> None:
        """Called by the proxy once per attempt; ejects the backend when its streak says so."""
        overload = status is not None and status in backend.adapter.overload_statuses
        reason = self.outliers.observe(backend.id, outcome, status, overload, time.monotonic())
        if reason is not None:
            self._metrics.ejections.labels(backend.url, reason).inc()
            self._metrics.ejected.labels(backend.url).set(1)
            self.apply()

    # ---- active checks --------------------------------------------------------------------------

    def due(self, now: float, busy: Collection[int] = ()) -> list[int]:
        """Backends to probe now: their interval is up, or their cool-down just ended (those in
        `busy`, whose check is under way, wait for it)."""
        return [
            backend_id
            for backend_id, checks in self._checks.items()
            if backend_id not in busy and self._is_due(backend_id, checks, now)
        ]

    def _is_due(self, backend_id: int, checks: _Checks, now: float) -> bool:
        if now >= checks.next_at:
            return True
        end = self.outliers.ejection_end(backend_id)
        return end is not None and checks.last_at < end <= now

    def next_wake(self, now: float, busy: Collection[int] = ()) -> float:
        """Seconds until something not in `busy` is due (bounded by the interval)."""
        wake = now + self.config.interval_s
        for backend_id, checks in self._checks.items():
            if backend_id in busy:
                continue
            wake = min(wake, checks.next_at)
            end = self.outliers.ejection_end(backend_id)
            if end is not None and checks.last_at < end:
                wake = min(wake, end)
        return max(_SLEEP_MIN_S, wake - now)

    async def check(self, client: httpx.AsyncClient, backend_id: int) -> bool:
        """Probes one backend and records the result; True when a state may have changed."""
        backend, checks = self.fleet.backends.get(backend_id), self._checks.get(backend_id)
        if backend is None or checks is None:
            return False  # removed since the round began
        passed = await _probe(client, backend.url, checks.probe)
        if self._checks.get(backend_id) is not checks:
            return False
        now = time.monotonic()
        checks.last_at, checks.next_at = now, now + self.config.interval_s
        self._metrics.checks.labels(backend.url, "pass" if passed else "fail").inc()
        changed = self._count(backend, checks, passed)
        if passed and self.outliers.cooled_down(backend_id, now):
            self.outliers.readmit(backend_id, now)
            self._metrics.ejected.labels(backend.url).set(0)
            changed = True
        return changed

    def _count(self, backend: Backend, checks: _Checks, passed: bool) -> bool:
        if passed:
            checks.passes, checks.failures = checks.passes + 1, 0
            # A backend that never passed (still loading) is ready at its first pass; one that was
            # taken out must prove itself `healthy_threshold` times.
            needed = self.config.healthy_threshold if checks.ever_passed else 1
            checks.ever_passed = True
            flip = not checks.healthy and checks.passes >= needed
        else:
            checks.passes, checks.failures = 0, checks.failures + 1
            flip = checks.healthy and checks.failures >= self.config.unhealthy_threshold
        if flip:
            checks.healthy = passed
            self._metrics.healthy.labels(backend.url).set(1 if passed else 0)
        return flip

    def readmit_unchecked(self, now: float) -> bool:
        """Without active checks, an ejected backend comes back when its cool-down ends."""
        readmitted = False
        for backend_id, backend in self.fleet.backends.items():
            if self.outliers.cooled_down(backend_id, now):
                self.outliers.readmit(backend_id, now)
                self._metrics.ejected.labels(backend.url).set(0)
                readmitted = True
        return readmitted

    def needs_models(self, backend_id: int) -> bool:
        """The backend's last check passed but its models are still unknown (it was down when
        they were asked)."""
        backend, checks = self.fleet.backends.get(backend_id), self._checks.get(backend_id)
        if backend is None or checks is None or backend.models_known:
            return False
        return checks.healthy and checks.passes > 0

    # ---- the native state ----------------------------------------------------------------------

    def apply(self) -> None:
        """Sets every backend's native state from its checks, its ejection and the panic rule."""
        panic = self._panic_members()
        for backend_id, backend in self.fleet.backends.items():
            state, reason = self._decided(backend_id, panic)
            if state != self._states[backend_id]:
                self._set_state(backend, state, reason)

    def _decided(self, backend_id: int, panic: set[int]) -> tuple[str, str]:
        """The state the checks, the ejection and the panic rule give a backend, and why."""
        healthy = self._checks[backend_id].healthy
        ejected = self.outliers.is_ejected(backend_id)
        state = "active" if healthy and (not ejected or backend_id in panic) else "down"
        return state, self._why(backend_id, healthy, ejected)

    def drain(self, backend_id: int) -> None:
        """An operator's drain: the backend takes nothing new (what is in flight completes) and
        health checks leave its state alone until `undrain`."""
        backend = self.fleet.backends[backend_id]
        old = self.fleet.router.accelerator_stats(backend_id).state
        if old != "draining":
            self.fleet.set_state(backend_id, "draining")
            self._announce(backend, old, "draining", "drained by an operator")

    def undrain(self, backend_id: int) -> None:
        """Ends an operator's drain: the backend takes the state its checks and ejection give it
        now (the fleet then serves admission's waiters if it is active)."""
        backend = self.fleet.backends[backend_id]
        if self.fleet.router.accelerator_stats(backend_id).state != "draining":
            return
        state, reason = self._decided(backend_id, self._panic_members())
        self._states[backend_id] = state
        self.fleet.set_state(backend_id, state)
        self._announce(backend, "draining", state, f"drain ended, {reason}")

    def _panic_members(self) -> set[int]:
        members_in_panic: set[int] = set()
        panic_pools: set[str] = set()
        share = self.fleet_share
        for model in self.fleet.models:
            members = self.fleet.pool_of(model)
            healthy = [m for m in members if self._checks[m].healthy]
            eligible = [m for m in healthy if not self.outliers.is_ejected(m)]
            if len(eligible) < len(healthy) and len(eligible) < math.ceil(share * len(members)):
                members_in_panic.update(healthy)
                panic_pools.add(model)
        for model in panic_pools - self._panic_pools:
            log.warning("pool %r: too few eligible backends, routing to ejected ones too (panic)", model)
        self._panic_pools = panic_pools
        self._metrics.panic.set(len(panic_pools))
        return members_in_panic

    @property
    def fleet_share(self) -> float:
        return self.outliers.config.min_eligible_share if self.outliers.config.enabled else 0.0

    def _why(self, backend_id: int, healthy: bool, ejected: bool) -> str:
        if not healthy:
            checks = self._checks[backend_id]
            waiting = self.config.require_ready and not checks.ever_passed
            return "not ready yet" if waiting else "health checks failed"
        if ejected:
            return f"ejected ({self.outliers.reason(backend_id)})"
        return "healthy"

    def _set_state(self, backend: Backend, state: str, reason: str) -> None:
        if self.fleet.router.accelerator_stats(backend.id).state == "draining":
            return  # an operator's drain is theirs to undo
        old, self._states[backend.id] = self._states[backend.id], state
        self.fleet.set_state(backend.id, state)  # back to active: admission's waiters are served
        self._announce(backend, old, state, reason)

    def _announce(self, backend: Backend, old: str, state: str, reason: str) -> None:
        self._metrics.transitions.labels(backend.url, state).inc()
        level = logging.WARNING if state == "down" else logging.INFO
        log.log(level, "backend %s: %s -> %s (%s)", backend.url, old, state, reason)
        if self._state_observers is not None:
            self._state_observers.notify(backend=backend.info, old=old, new=state, reason=reason)

    def status_of(self, backend_id: int) -> dict[str, Any]:
        ejected = self.outliers.is_ejected(backend_id)
        return {
            "healthy": self._checks[backend_id].healthy,
            "ejected": ejected,
            "ejection_reason": self.outliers.reason(backend_id) if ejected else None,
        }


async def _probe(client: httpx.AsyncClient, base_url: str, probe: HealthProbe) -> bool:
    try:
        async with asyncio.timeout(probe.timeout_s):  # a hard bound over connect + read
            response = await client.get(base_url + probe.path, timeout=probe.timeout_s)
    except (httpx.HTTPError, TimeoutError, OSError):
        return False
    return response.status_code in probe.ok_statuses


class FleetMonitor:
    """Runs health checks and signal scraping for a `RoutingMiddleware`, from startup to shutdown."""

    def __init__(
        self, fleet: Fleet, config: RouterConfig, manager: pluggy.PluginManager, registry: CollectorRegistry
    ) -> None:
        self.health = FleetHealth(fleet, config, manager, registry)
        self.signals = SignalScraper(fleet, config, registry)
        self._fleet = fleet
        self._config = config
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._checking: dict[int, asyncio.Task[None]] = {}
        """The checks under way, by backend: one at a time per backend."""
        self._wake = asyncio.Event()
        self._next_discovery_at = 0.0

    async def start(self) -> None:
        """Starts the tasks; with `require_ready`, first waits for one round of checks (bounded
        by the probe timeout) so ready backends take traffic from the first request."""
        if self._client is not None:
            return
        self._client = httpx.AsyncClient(
            # No bound on connections (module docstring): a bound sized at startup would make the
            # probes of backends added later queue behind each other.
            limits=httpx.Limits(
                max_connections=None,
                max_keepalive_connections=None,
                keepalive_expiry=self._config.limits.keepalive_expiry_s,
            ),
            follow_redirects=False,
            trust_env=False,  # like the proxy's client: only configured backends are contacted
            verify=tls_context(),
        )
        self._wake = asyncio.Event()  # of this event loop (a test client may run several)
        health = self._config.health
        if health.enabled and health.require_ready:
            await self._check_round(list(self._fleet.backends))
        self._tasks.append(asyncio.create_task(self._health_loop(), name="irm-health"))
        # In the background: a backend that hangs must not hold the startup up.
        self._tasks.append(asyncio.create_task(self._fleet.check_listed(self._client), name="irm-listed"))
        if self.signals.active:
            self._tasks.append(asyncio.create_task(self.signals.run(self._client), name="irm-signals"))

    async def stop(self) -> None:
        """Cancels the tasks, waits for them and closes the client (lifespan shutdown)."""
        tasks, self._tasks = [*self._tasks, *self._checking.values()], []
        self._checking = {}
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def observe(self, backend: Backend, outcome: AttemptOutcome, status: int | None) -> None:
        self.health.observe(backend, outcome, status)

    async def admit(self, backend: Backend) -> bool:
        """Probes a backend not yet in the fleet and, when it passes, asks it its models (unless
        configured); False when either fails. The caller refuses it, or lets it join down: its
        health checks bring it in (with its models) when it answers."""
        if self._client is None:
            raise RuntimeError("the monitor is not started")
        healthy = await self.health.probe(self._client, backend)
        if healthy and not backend.models:
            healthy = await self._fleet.discover_models(self._client, backend) and bool(backend.models)
        return healthy

    def add(self, backend: Backend, healthy: bool) -> str:
        """Watches a backend about to join the fleet; returns the state it starts in."""
        state = self.health.add(backend, healthy)
        self.signals.add(backend)
        client = self._client
        if client and self.signals.active and not any(t.get_name() == "irm-signals" for t in self._tasks):
            self._tasks.append(asyncio.create_task(self.signals.run(client), name="irm-signals"))
        self._wake.set()  # its first check may be due before the loop's next wake
        return state

    def remove(self, backend: Backend) -> None:
        self.health.remove(backend)
        self.signals.remove(backend)

    def status_of(self, backend_id: int) -> dict[str, Any]:
        return {**self.health.status_of(backend_id), "signals": self.signals.status_of(backend_id)}

    async def _health_loop(self) -> None:
        while True:
            try:
                await self._health_tick()
            except Exception:  # keep watching the fleet whatever one round hit
                log.exception("health check round failed")
            delay = self.health.next_wake(time.monotonic(), self._checking.keys())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()  # a check ended, or a backend joined
            self._wake.clear()

    async def _health_tick(self) -> None:
        now = time.monotonic()
        if not self._config.health.enabled:
            if self.health.readmit_unchecked(now):
                self.health.apply()
            await self._rediscover_unchecked(now)
            return
        for backend_id in self.health.due(now, self._checking.keys()):
            self._checking[backend_id] = asyncio.create_task(
                self._check(backend_id), name=f"irm-health-{backend_id}"
            )

    async def _check(self, backend_id: int) -> None:
        """One backend's check, as a task of its own; the native state follows at once."""
        client = self._client
        assert client is not None
        try:
            changed = await self.health.check(client, backend_id)
            if self.health.needs_models(backend_id):
                # A backend that was down when its models were asked has them now.
                await self._fleet.discover(client, [self._fleet.backends[backend_id]])
                changed = True
            if changed:
                self.health.apply()
        except Exception:  # one backend's check must not end the others'
            log.exception("health check of backend %d failed", backend_id)
        finally:
            if self._checking.get(backend_id) is asyncio.current_task():
                del self._checking[backend_id]
            self._wake.set()

    async def _rediscover_unchecked(self, now: float) -> None:
        """Without active checks, backends whose models are unknown are asked every `interval_s`."""
        if now < self._next_discovery_at or not self._fleet.models_unknown():
            return
        self._next_discovery_at = now + self._config.health.interval_s
        assert self._client is not None
        await self._fleet.discover(self._client)

    async def _check_round(self, backend_ids: list[int]) -> None:
        """Checks `backend_ids` at once and waits for all (startup with `require_ready`)."""
        client = self._client
        assert client is not None
        await asyncio.gather(*(self.health.check(client, b) for b in backend_ids))
        ready = [b for b in backend_ids if self.health.needs_models(b)]
        if ready:
            await self._fleet.discover(client, [self._fleet.backends[b] for b in ready])
        self.health.apply()
