"""The fleet: configured backends in a `Router`, one pool per model, and the strategy that picks.

This is where a routing decision is made and a lease is taken; `_middleware` decides when, and
releases the lease (in exactly one place). Nothing here does I/O except model discovery.

Every change that can make room without a release goes through the fleet too (a backend set
active, a new capacity or weight, a backend that gained models at discovery), and the fleet tells
whoever listens (`on_capacity`: admission, whose waiters take the room at once).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import httpx

from irmiddleware._errors import DuplicateBackendError
from irmiddleware._native import CAPACITY_MAX
from irmiddleware._plugins import Registry
from irmiddleware._router import Accelerator, AcceleratorStats, Lease, prefix_hashes
from irmiddleware.hooks import (
    BackendAdapter,
    BackendInfo,
    BackendLoad,
    NativeStrategy,
    PythonStrategy,
    RouteInfo,
)
from irmiddleware.proxy._cost import RequestCost
from irmiddleware.proxy._metrics import RouterMetrics
from irmiddleware.proxy._shared import open_router
from irmiddleware.proxy.config import BackendConfig, RouterConfig

__all__ = ["Backend", "Fleet", "FleetChangeRefused"]

log = logging.getLogger("irmiddleware.proxy")

_SLOTS_MIN: Final = 256


class FleetChangeRefused(Exception):
    """A change of the fleet that cannot be made; `status` is the HTTP status the admin API
    answers (404 unknown backend, 409 conflict, 502 the backend does not answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Backend:
    """A configured backend and what the router knows about it. `id` is its accelerator id."""

    id: int
    url: str
    type: str
    adapter: BackendAdapter
    models: tuple[str, ...]
    metrics_url: str | None = None
    """Where its load signals are scraped, when configured (else the adapter's default)."""
    models_known: bool = True
    """False until a backend configured without `models` has answered which models it serves (it
    may be down at startup): while one is unknown, a model nobody serves may yet be served."""

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(self.id, self.url, self.type, self.models)


class Fleet:
    """Backends, per-model pools and the configured strategy, over one native `Router`."""

    def __init__(self, config: RouterConfig, registry: Registry, metrics: RouterMetrics) -> None:
        strategy, self._strategy_plugin = registry.strategy(config.strategy)
        self.strategy_name = config.strategy
        self._python: PythonStrategy | None = strategy if isinstance(strategy, PythonStrategy) else None
        native = strategy.native if isinstance(strategy, NativeStrategy) else strategy.fallback
        self.cost = RequestCost(config)
        """What a request costs (`[router] cost`); capacities are scaled to the same unit."""
        # With `shared_table`, one table for every process of the router (`_shared`).
        self.shared_table = config.shared_table or None
        self.router = open_router(
            native,
            self.shared_table,
            # Room for backends added while it runs (the admin API, SIGHUP): a slot is reused
            # once its backend is removed and its last request released.
            max_accelerators=max(_SLOTS_MIN, 2 * len(config.backends)),
            signal_age_max_s=config.signals.max_age_s,
            class_shares=config.admission.class_shares,
            balance_epsilon=config.affinity.balance_epsilon,
            # Costs in tokens: a prompt block is worth its tokens, and the blocks the chosen
            # backend has cached are taken off the reservation.
            block_cost=self.cost.block_tokens(config.affinity.prefix_block_chars)
            if self.cost.tokens
            else None,
            discount_cached=self.cost.tokens,
        )
        # Only the cache-aware strategies (and costs in tokens) read a request's session key or
        # prompt: the others skip extracting them (and hashing the prompt).
        self.wants_session_key = native == "consistent_hash"
        self.wants_prompt = native in ("prefix_affinity", "least_ttft") or self.cost.tokens
        self._block_chars = config.affinity.prefix_block_chars
        self._affinity_outcomes = {
            outcome: metrics.affinity.labels(config.strategy, outcome)
            for outcome in ("hit", "miss", "overload")
        }
        self.backends: dict[int, Backend] = {}
        try:
            self._add_backends(config, registry)
        except BaseException:
            # An unknown adapter type is a configuration error: the table must not outlive it.
            self.router.close()
            raise
        self._pools: dict[str, frozenset[int]] = {}
        self._pool_types: dict[str, str] = {}
        self._defaults: dict[str, str] = {}
        """The model of each backend type that serves exactly one."""
        self._metrics = metrics
        self._decided = {
            result: metrics.decisions.labels(config.strategy, result)
            for result in ("routed", "no_capacity", "fallback", "retry")
        }
        self._capacity_listeners: list[Callable[[], None]] = []
        self._change_listeners: list[Callable[[], None]] = []
        # The models of a backend that did not answer are asked again at its next passing health
        # check (or, without active checks, every `interval_s`): a client told to come back then
        # finds them.
        self.models_retry_after_s = max(1, math.ceil(config.health.interval_s))
        self._rebuild_pools()

    def _add_backends(self, config: RouterConfig, registry: Registry) -> None:
        self._registry = registry
        for backend_id, entry in enumerate(config.backends):
            adapter = registry.adapter(entry.type)
            self.backends[backend_id] = _backend(backend_id, entry, adapter)
            accelerator = Accelerator(backend_id, self._capacity(entry.capacity), entry.weight)
            try:
                self.router.add_accelerator(accelerator)
            except DuplicateBackendError:
                if self.shared_table is None:
                    raise
                # Another process of the router (on the shared table) added it first.
            self.router.set_ring_name(backend_id, entry.url)
            self.router.set_batch_slots(backend_id, entry.batch_slots)
        self._next_id = len(config.backends)

    def _capacity(self, configured: int) -> int:
        """A configured capacity in the core's cost unit (tokens, with costs in tokens)."""
        return min(configured * self.cost.capacity_scale, CAPACITY_MAX)

    # ---- backends added and removed while routing goes on (on the event loop) ------------------

    def new_backend(self, entry: BackendConfig) -> Backend:
        """A `Backend` for `entry` with the next unused id, not yet in the fleet (probe it, ask it
        its models, then `add`); ValueError for an unknown adapter type."""
        adapter = self._registry.adapter(entry.type)
        backend = _backend(self._next_id, entry, adapter)
        self._next_id += 1
        return backend

    def add(self, backend: Backend, entry: BackendConfig, state: str) -> None:
        """Puts `backend` in the core (capacity, weight, `state`) and in its models' pools, in one
        step of the event loop: no request sees it half added."""
        self.router.add_accelerator(Accelerator(backend.id, self._capacity(entry.capacity), entry.weight))
        # By URL, not id: replicas that list or add backends in another order build the same ring.
        self.router.set_ring_name(backend.id, entry.url)
        self.router.set_batch_slots(backend.id, entry.batch_slots)
        self.router.set_state(backend.id, state)
        self.backends[backend.id] = backend
        self._rebuild_pools()
        if state == "active":
            self._capacity_appeared()

    def check_new(self, entry: BackendConfig) -> None:
        """FleetChangeRefused unless `entry` may join: its URL is not in the fleet, and each model
        it lists is served by backends of its type (or by none)."""
        for backend in self.backends.values():
            if backend.url == entry.url:
                raise FleetChangeRefused(409, f"{entry.url} is already backend {backend.id}")
        for model in entry.models:
            kind = self.type_of(model)
            if kind not in (None, entry.type):
                raise FleetChangeRefused(
                    400, f"model {model!r} is served by backends of type {kind!r}, not {entry.type!r}"
                )

    def remove(self, backend_id: int) -> Backend:
        """Takes a backend out of the core and of every pool, in one step of the event loop. Call
        it once nothing is in flight on it (a drained backend)."""
        backend = self.backends.pop(backend_id)
        self.router.remove_accelerator(backend_id)
        self._rebuild_pools()
        if all(other.url != backend.url for other in self.backends.values()):
            self._metrics.forget(backend.url)
        return backend

    # ---- one fleet for several processes on a shared table ----------------------------------------

    def on_change(self, listener: Callable[[], None]) -> None:
        """Calls `listener()` after every change of the backends or of their models (an add, a
        removal, models discovered), once the pools are rebuilt: `irmiddleware serve --workers`'
        supervisor publishes the fleet to its workers there."""
        self._change_listeners.append(listener)

    def describe(self) -> list[dict[str, Any]]:
        """What another process needs to route to this fleet's backends: each one's id, URL, type,
        models and metrics URL (capacity, weight and state are in the shared table)."""
        return [
            {
                "id": b.id,
                "url": b.url,
                "type": b.type,
                "models": list(b.models),
                "models_known": b.models_known,
                "metrics_url": b.metrics_url,
            }
            for b in self.backends.values()
        ]

    def follow(self, described: Iterable[dict[str, Any]]) -> tuple[list[Backend], list[Backend]]:
        """Makes this fleet the one `described` (another process's `describe`), whose backends are
        in the shared table already: nothing is added to or removed from the table here. Returns
        the backends that joined and those that left (forgotten by this process's router)."""
        wanted = {int(entry["id"]): entry for entry in described}
        left = [self.backends.pop(i) for i in list(self.backends) if i not in wanted]
        for backend in left:
            self.router.forget_accelerator(backend.id)
            if all(other.url != backend.url for other in self.backends.values()):
                self._metrics.forget(backend.url)
        joined: list[Backend] = []
        for backend_id, entry in wanted.items():
            known = self.backends.get(backend_id)
            if known is None:
                new = self._followed(backend_id, entry)
                joined += [new] if new is not None else []
            elif entry["models_known"]:
                known.models, known.models_known = tuple(entry["models"]), True
        self._rebuild_pools()
        self._capacity_appeared()  # a backend that joined, or a model it now serves, has room
        return joined, left

    def _followed(self, backend_id: int, entry: dict[str, Any]) -> Backend | None:
        """A backend another process added, in this process's fleet; None (logged) when its type
        has no adapter here or it left the table meanwhile (the next change says so)."""
        try:
            adapter = self._registry.adapter(entry["type"])
            self.router.accelerator_stats(backend_id)
        except (ValueError, LookupError) as error:
            log.error("backend %s (%d) not followed: %s", entry["url"], backend_id, error)
            return None
        backend = Backend(
            backend_id,
            entry["url"],
            entry["type"],
            adapter,
            tuple(entry["models"]),
            entry["metrics_url"],
            entry["models_known"],
        )
        self.backends[backend_id] = backend
        return backend

    # ---- states and capacity -------------------------------------------------------------------

    def on_capacity(self, listener: Callable[[], None]) -> None:
        """Calls `listener()` whenever capacity may have appeared without a release. It is called
        on the thread that made the change: a listener that touches the event loop must be safe
        to call from any thread."""
        self._capacity_listeners.append(listener)

    def set_state(self, backend_id: int, state: str) -> None:
        """Sets a backend's routing state ("active", "draining", "down"); entering "active" (back
        from down, or a drain ended) tells the capacity listeners."""
        self.router.set_state(backend_id, state)
        if state == "active":
            self._capacity_appeared()

    def update_backend(
        self, backend_id: int, *, capacity: int | None = None, weight: float | None = None
    ) -> None:
        """Changes a backend's capacity and/or weight while routing goes on, and tells the
        capacity listeners (a larger capacity has room for waiters)."""
        scaled = None if capacity is None else self._capacity(capacity)
        self.router.update_accelerator(backend_id, capacity=scaled, weight=weight)
        self._capacity_appeared()

    def _capacity_appeared(self) -> None:
        for listener in self._capacity_listeners:
            listener()

    # ---- models --------------------------------------------------------------------------------

    def serves(self, model: str) -> bool:
        return model in self._pools

    @property
    def models(self) -> list[str]:
        return sorted(self._pools)

    def pool_of(self, model: str) -> frozenset[int]:
        return self._pools.get(model, frozenset())

    def active_ids(self) -> set[int]:
        """The backends taking requests now (state "active", whatever their load), from one read
        of the core's stats."""
        return {stats.id for stats in self.router.stats() if stats.state == "active"}

    def any_active(self, model: str, exclude: frozenset[int] = frozenset()) -> bool:
        """Whether some backend serving `model`, not in `exclude`, is active (whatever its load)."""
        # One native read per member (~5 us each), not the whole fleet's stats: admission asks this
        # for every refusal, and an overload refuses many requests at once.
        return any(self._active(member) for member in self.pool_of(model) if member not in exclude)

    def _active(self, backend_id: int) -> bool:
        try:
            return self.router.accelerator_stats(backend_id).state == "active"
        except LookupError:  # another process removed it, and this one has not followed yet
            return False

    def type_of(self, model: str) -> str | None:
        """The backend type (adapter) of the pool serving `model`; None when no backend serves it."""
        return self._pool_types.get(model)

    def models_at(self, path: str) -> list[str]:
        """The models a client reaches through `path`: those whose backends' adapter routes it
        (an OpenAI client's `/v1/models` lists no Triton model, Triton's index no vLLM one)."""
        types = {b.type for b in self.backends.values() if any(e.path == path for e in b.adapter.endpoints)}
        return sorted(model for model, kind in self._pool_types.items() if kind in types)

    def models_unknown(self) -> list[Backend]:
        """The backends whose models are not known yet (configured without `models`, and not
        answered since): until every one has answered, an unknown model is not known to be
        served nowhere."""
        return [backend for backend in self.backends.values() if not backend.models_known]

    async def discover(self, client: httpx.AsyncClient, backends: Iterable[Backend] | None = None) -> None:
        """Asks `backends` (default: each one whose models are unknown) which models they serve,
        all at once. A backend that cannot be asked serves nothing until it is asked again (it is
        logged, not fatal)."""
        asking = self.models_unknown() if backends is None else list(backends)
        await asyncio.gather(*(self.discover_models(client, backend) for backend in asking))
        self._rebuild_pools()
        self._capacity_appeared()  # a backend that joined a pool brings its capacity with it

    @staticmethod
    async def discover_models(client: httpx.AsyncClient, backend: Backend) -> bool:
        """Asks one backend which models it serves (sets `backend.models`); False, logged, when it
        cannot be asked or has no models path."""
        listed = await Fleet.ask_models(client, backend)
        if listed is None:
            return False
        backend.models, backend.models_known = listed, True
        return True

    @staticmethod
    async def ask_models(
        client: httpx.AsyncClient, backend: Backend, *, quiet: bool = False
    ) -> tuple[str, ...] | None:
        """The models `backend` lists; None when it has no models path or cannot be asked (logged
        at warning, unless `quiet`)."""
        if backend.adapter.models_path is None:
            return None
        try:
            response = await client.request(
                backend.adapter.models_method, backend.url + backend.adapter.models_path
            )
            response.raise_for_status()
            return tuple(backend.adapter.parse_models(response.content))
        except (httpx.HTTPError, ValueError, KeyError, AttributeError) as error:
            if not quiet:
                log.warning("model discovery failed for %s: %r", backend.url, error)
            return None

    async def check_listed(self, client: httpx.AsyncClient) -> None:
        """Warns, one line per backend, about configured models a backend does not list (a typo in
        `--model`, or the wrong server): requests for them sent there would fail. A backend that
        does not answer now is not checked (its health checks say it is down)."""
        configured = [b for b in self.backends.values() if b.models and b.adapter.models_path]
        # A plugin adapter's parser may raise anything: a check that fails says nothing.
        asked = [self.ask_models(client, b, quiet=True) for b in configured]
        listed = await asyncio.gather(*asked, return_exceptions=True)
        for backend, models in zip(configured, listed, strict=True):
            if not isinstance(models, tuple):
                continue
            missing = [model for model in backend.models if model not in models]
            if missing:
                log.warning(
                    "backend %s does not list %s it is configured with; it lists: %s",
                    backend.url,
                    ", ".join(f"`{model}`" for model in missing),
                    ", ".join(models) or "no model",
                )

    def default_model(self, adapter: BackendAdapter) -> str | None:
        """For a `single_model` adapter (TGI): the one model its type's backends serve, which a
        request that names none goes to; None when it is ambiguous."""
        return self._defaults.get(adapter.type_name) if adapter.single_model else None

    def _rebuild_pools(self) -> None:
        members: dict[str, dict[str, list[int]]] = {}
        for backend in self.backends.values():
            for model in backend.models:
                members.setdefault(model, {}).setdefault(backend.type, []).append(backend.id)
        for model in set(self._pools) - set(members):
            self.router.remove_pool(model)
        self._pools, self._pool_types = {}, {}
        for model, by_type in members.items():
            kind = _pool_type(model, by_type)
            self.router.set_pool(model, by_type[kind])
            self._pools[model], self._pool_types[model] = frozenset(by_type[kind]), kind
        served: dict[str, list[str]] = {}
        for model, kind in self._pool_types.items():
            served.setdefault(kind, []).append(model)
        self._defaults = {kind: models[0] for kind, models in served.items() if len(models) == 1}
        for listener in self._change_listeners:
            listener()

    # ---- routing -------------------------------------------------------------------------------

    def acquire(self, route: RouteInfo, exclude: Iterable[int] = ()) -> Lease | None:
        """Reserves `route.cost` on a backend serving `route.model`, skipping `exclude` (backends
        that already failed this request); None when nothing fits."""
        if route.model not in self._pools:
            return None  # its last backend was removed while the request waited
        excluded = frozenset(exclude)
        if excluded:
            lease = self._acquire_retry(route, excluded)
            self._decided["retry" if lease else "no_capacity"].inc()
            return lease
        if self._python is not None:
            lease = self._acquire_python(self._python, route)
        else:
            lease = self._acquire_native(route)
        self._decided["routed" if lease else "no_capacity"].inc()
        return lease

    def _acquire_native(self, route: RouteInfo) -> Lease | None:
        hashes = None
        if self.wants_prompt and route.prompt:
            hashes = prefix_hashes(route.prompt, self._block_chars)
        key = route.session_key if self.wants_session_key else None
        lease = self.router.acquire(
            route.cost, route.priority, pool=route.model, affinity_key=key, prefix_hashes=hashes
        )
        if lease is not None and lease.affinity is not None:
            self._affinity_outcomes[lease.affinity].inc()
        return lease

    def _acquire_python(self, strategy: PythonStrategy, route: RouteInfo) -> Lease | None:
        members = self._pools[route.model]
        snapshot = self.snapshot(members)
        try:
            chosen = strategy.pick(snapshot, route)
        except Exception as error:
            # Nothing is reserved before pick returns, so a raising strategy cannot leak load.
            return self._fallback(route, f"raised {error!r}")
        if chosen is None:
            return None
        if chosen not in members:
            return self._fallback(route, f"returned {chosen!r}, not a backend of pool {route.model!r}")
        lease = self.router.acquire_on(chosen, route.cost, route.priority)
        if lease is None:
            return self._fallback(route, f"picked backend {chosen} which cannot take the request")
        return lease

    def _fallback(self, route: RouteInfo, why: str) -> Lease | None:
        log.error(
            "strategy %r (plugin %r) %s; using the native fallback",
            self.strategy_name,
            self._strategy_plugin,
            why,
        )
        self._decided["fallback"].inc()
        return self.router.acquire(route.cost, route.priority, pool=route.model)

    def has_other(self, route: RouteInfo, excluded: Iterable[int]) -> bool:
        """Whether some other backend of the pool could take the request now (a hint: by the time
        it is acquired, it may be full)."""
        skip = frozenset(excluded)
        return any(
            b.state == "active" and b.id not in skip and b.load + route.cost <= b.capacity
            for b in self.snapshot(self._pools.get(route.model, frozenset()))
        )

    def _acquire_retry(self, route: RouteInfo, excluded: frozenset[int]) -> Lease | None:
        # Retries are rare (a backend refused a connection): pick the least utilized remaining
        # member in Python rather than teaching the native pools about exclusions.
        candidates = [
            b for b in self.snapshot(self._pools.get(route.model, frozenset())) if b.id not in excluded
        ]
        candidates.sort(key=lambda b: b.load / b.capacity)
        for candidate in candidates:
            lease = self.router.acquire_on(candidate.id, route.cost, route.priority)
            if lease is not None:
                return lease
        return None

    def backend_stats(self) -> list[tuple[str, AcceleratorStats]]:
        """(URL, native stats) of every configured backend, read from the core now."""
        known = self.backends
        return [(known[s.id].url, s) for s in self.router.stats() if s.id in known]

    def snapshot(self, members: frozenset[int]) -> tuple[BackendLoad, ...]:
        """A read-only view of the members' load, for Python strategies."""
        return tuple(
            BackendLoad(
                id=s.id,
                url=self.backends[s.id].url,
                state=s.state,
                capacity=s.capacity,
                weight=s.weight,
                load=s.load,
                requests_in_flight=s.requests_in_flight,
                latency_ewma_s=s.latency_ewma_s,
                completed=s.completed,
                failed=s.failed,
            )
            for s in self.router.stats()
            if s.id in members
        )


def _backend(backend_id: int, entry: BackendConfig, adapter: BackendAdapter) -> Backend:
    # Without a models path, nothing can be asked: the configured models (none) are all there is.
    known = bool(entry.models) or adapter.models_path is None
    return Backend(backend_id, entry.url, entry.type, adapter, entry.models, entry.metrics_url, known)


def _pool_type(model: str, by_type: dict[str, list[int]]) -> str:
    """The one backend type whose backends serve `model`. The configuration refuses a model listed
    for two types; discovery can still find one, and then the type with the most backends serving
    it keeps it (ties: the first type name), whatever the configuration's order, and the others'
    backends are left out of its pool."""
    kind = min(by_type, key=lambda name: (-len(by_type[name]), name))
    if len(by_type) > 1:
        left_out = sorted(set(by_type) - {kind})
        log.error(
            "model %r is served by backends of types %s; only the %r backends serve it (a model's "
            "pool speaks one protocol)",
            model,
            ", ".join([kind, *left_out]),
            kind,
        )
    return kind
