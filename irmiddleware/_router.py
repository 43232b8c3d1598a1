"""The Python routing API: the seed's `Accelerator`, `Request` and `Router`, plus what a real user
needs on top (completion, leases, draining, stats, batches, shared tables) and a slot-level fast
path for code that routes millions of requests in one process.

All decisions and all load accounting happen in the native core (`_native.NativeTable`); this
module maps accelerator ids to the core's slots and request ids to their reservations.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
import types
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, NoReturn

from irmiddleware import _errors, _native
from irmiddleware._native import (
    CLASSES_COUNT,
    COST_MAX,
    REQUEST_ID_MAX,
    ROUTE_NONE,
    ROUTE_SLOT_BASE,
    SLOT_NONE,
    TICKET_SLOT_MASK,
    SlotRecord,
    State,
)

STRATEGIES: Final = {
    "round_robin": _native.StrategyCode.ROUND_ROBIN,
    "least_connections": _native.StrategyCode.LEAST_CONNECTIONS,
    "p2c": _native.StrategyCode.P2C,
    "consistent_hash": _native.StrategyCode.CONSISTENT_HASH,
    "prefix_affinity": _native.StrategyCode.PREFIX_AFFINITY,
    "queue_aware": _native.StrategyCode.QUEUE_AWARE,
    "least_ttft": _native.StrategyCode.LEAST_TTFT,
}
_OUTCOMES: Final = {
    _native.Outcome.NONE: None,
    _native.Outcome.HIT: "hit",
    _native.Outcome.MISS: "miss",
    _native.Outcome.OVERLOAD: "overload",
}


def affinity_key_hash(key: int | str | bytes) -> int:
    """The 64-bit ring position of a session key: ints as they are, strings and bytes through
    BLAKE2b (stable across processes and restarts, unlike `hash()`)."""
    if isinstance(key, int):
        return key & (2**64 - 1)
    raw = key.encode() if isinstance(key, str) else bytes(key)
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def prefix_hashes(text: str | bytes, block_bytes: int = 64) -> Sequence[int]:
    """Chained hashes of `text`'s full blocks of `block_bytes` (UTF-8) bytes, as vLLM's prefix
    cache does (each covers everything before it): pass them as `prefix_hashes=`."""
    return _native.prefix_hashes(text, block_bytes)  # type: ignore[no-any-return]


_STATES: Final = {"active": State.ACTIVE, "draining": State.DRAINING, "down": State.DOWN}


def strategy_id(name: str) -> int:
    """The native number of a strategy name; ValueError names the valid ones."""
    try:
        return int(STRATEGIES[name])
    except (KeyError, TypeError):
        valid = ", ".join(sorted(STRATEGIES))
        raise ValueError(f"unknown strategy {name!r}; valid strategies: {valid}") from None


class Accelerator:
    """A compute unit (GPU, TPU, inference server) that can hold `capacity` cost units at once.

    `weight` scales its share under load-aware strategies (2.0 = counts as twice as big). Once added
    to a router, `current_load` reads its live in-flight cost from the core.
    """

    __slots__ = ("_router", "capacity", "id", "weight")

    def __init__(self, id: int, capacity: int, weight: float = 1.0) -> None:
        if type(id) is not int or not 0 <= id < 2**64:
            raise ValueError(f"accelerator id must be an int in 0..2**64-1, got {id!r}")
        self.id = id
        self.capacity = _native.check_capacity(capacity)
        _native.weight_to_milli(weight)
        self.weight = float(weight)
        self._router: Router | None = None

    @property
    def current_load(self) -> int:
        """Cost units in flight on this accelerator (0 if it is not in a router)."""
        if self._router is None:
            return 0
        return self._router.load(self.id)

    def __repr__(self) -> str:
        return f"Accelerator(id={self.id}, capacity={self.capacity}, weight={self.weight})"


class Request(_native.RequestBase):
    """A unit of work: `cost` capacity units at `priority` (0 = most important, up to 7).

    `Request(id, cost=1, priority=0)`; `id` is any hashable. Its fields live in the core's request
    type (`_native.RequestBase`), so building one and routing it run no Python line."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Request(id={self.id!r}, cost={self.cost}, priority={self.priority})"

    def __reduce__(self) -> tuple[type[Request], tuple[object, int, int]]:
        return type(self), (self.id, self.cost, self.priority)


class Lease:
    """A reservation on one accelerator. Release it exactly once (`release`, or use it as a
    context manager: a clean exit counts as success, an exception as failure)."""

    __slots__ = (
        "_router",
        "_started_ns",
        "accelerator_id",
        "affinity",
        "cost",
        "matched_blocks",
        "released",
        "slot",
        "ticket",
    )

    def __init__(
        self,
        router: Router,
        ticket: int,
        accelerator_id: int,
        cost: int,
        affinity: str | None = None,
        matched_blocks: int = 0,
    ) -> None:
        self._router = router
        #: The reservation's name in the core (`Router.acquire_slot` returns one); `slot` is
        #: the accelerator's slot, its low half.
        self.ticket = ticket
        self.slot = ticket & TICKET_SLOT_MASK
        self.accelerator_id = accelerator_id
        self.cost = cost
        #: For affinity strategies: "hit", "miss" or "overload" (affinity yielded to load).
        self.affinity = affinity
        #: For prefix_affinity: how many prompt blocks the chosen backend had seen.
        self.matched_blocks = matched_blocks
        self.released = False
        self._started_ns = time.perf_counter_ns()

    def release(self, ok: bool = True, latency_s: float | None = None) -> None:
        """Returns the cost to the accelerator and records the outcome. `latency_s` defaults to
        the time since the lease was taken."""
        if self.released:
            raise _errors.ReleaseMismatchError("release_mismatch", "lease already released")
        latency_us = _latency_us(self._started_ns, latency_s)
        self.released = True
        self._router.release_slot(self.ticket, self.cost, latency_us, ok)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self.released:
            self.release(ok=exc_type is None)

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"Lease(accelerator_id={self.accelerator_id}, cost={self.cost}, {state})"


@dataclass(frozen=True, slots=True)
class AcceleratorStats:
    """An accelerator's counters at one instant."""

    id: int
    state: str
    capacity: int
    weight: float
    load: int
    requests_in_flight: int
    routed: int
    completed: int
    failed: int
    latency_ewma_s: float

    @property
    def utilization(self) -> float:
        return self.load / self.capacity


class Router:
    """Routes requests to accelerators with a native strategy.

    `Router("p2c")` keeps the seed's API (`add_accelerator`, `route_request`). A request routed with
    `route_request` holds its cost until `complete(request)`; `lease(request)` does both around a
    `with` block. `shared_memory="name"` puts the table in a named shared-memory segment so worker
    processes on one host share one set of counters (the first creates it, the others attach).
    `owner=k` (1..63, with `shared_memory`) records this process's reservations as owner k's, so
    that if it dies another process gives them back with `reclaim_owner(k)` (doc/reclaim.md).

    `block_cost` is what `least_ttft` charges a backend for each prompt block it has not cached, in
    cost units (default 0.05; with costs in tokens, the block's tokens). With `discount_cached`,
    `acquire` with `prefix_hashes` (and `acquire_slot_priced`) reserves the cost less the value
    of the blocks the chosen accelerator has cached (at least 1); the lease releases exactly that.
    """

    def __init__(
        self,
        strategy: str = "p2c",
        *,
        max_accelerators: int = 65_536,
        shared_memory: str | None = None,
        class_shares: Sequence[float] | None = None,
        seed: int | None = None,
        prefix_index_entries: int = 65_536,
        balance_epsilon: float | None = None,
        signal_age_max_s: float | None = None,
        block_cost: float | None = None,
        discount_cached: bool = False,
        owner: int | None = None,
    ) -> None:
        _check_owner(owner, shared_memory)
        self._strategy = strategy_id(strategy)
        # least_ttft's price of an uncached prompt block, in cost units (thousandths in the core),
        # and whether a request's reservation is discounted by the blocks its backend has cached.
        self._block_cost_milli = _block_cost_milli(block_cost)
        self._discount_cached = bool(discount_cached)
        self.strategy = strategy
        self._table = self._open_table(max_accelerators, prefix_index_entries, shared_memory)
        self._ids_by_slot: list[int | None] = [None] * self._table.backends_max
        self._slots_by_id: dict[int, int] = {}
        self._accelerators: dict[int, Accelerator] = {}
        # The seed API's per-call path: the core's `irm_route` and the table's handle, called bare
        # (no wrapper: every layer adds to the per-call cost). The core records each request it
        # routes (ids that are ints in 0..2**64-1, routed without options).
        self._route, self._handle = self._table.route_call()
        # Every other reservation of route_request/route_batch by request id: (ticket, cost,
        # start in perf_counter_ns).
        self._in_flight: dict[object, tuple[int, int, int]] = {}
        self._pools: dict[str, tuple[tuple[int, ...], int, _native.Pool]] = {}
        try:
            if owner is not None:
                self._table.attach_owner(owner)
            self._configure(class_shares, seed, balance_epsilon, signal_age_max_s)
            if shared_memory is not None:
                self._refresh_ids()
        except BaseException:
            # A refused option must not leave the table to the garbage collector: the core's
            # registry of tables is bounded.
            self._table.close()
            raise
        self._install_builtins()

    def _install_builtins(self) -> None:
        """Makes this instance's `route_request` and `complete` the core's builtins
        (`_native.seed_builtins`): the seed API's plain call then runs no Python line at all, and
        anything else (options, ids the core does not record) reaches the methods below through
        them. Not for a subclass that overrides either method."""
        cls = type(self)
        if cls.route_request is not Router.route_request or cls.complete is not Router.complete:
            return
        builtins = _native.seed_builtins(
            self._handle,
            self._strategy,
            self._in_flight,
            Request,
            weakref.WeakMethod(types.MethodType(Router.route_request, self)),
            weakref.WeakMethod(types.MethodType(Router.complete, self)),
        )
        if builtins is not None:
            # In the instance's dict, so `router.route_request` finds them before the class's
            # methods; weak references back (above), so the router is freed as soon as unused.
            self.__dict__["route_request"], self.__dict__["complete"] = builtins

    def _configure(
        self,
        class_shares: Sequence[float] | None,
        seed: int | None,
        balance_epsilon: float | None,
        signal_age_max_s: float | None,
    ) -> None:
        if class_shares is not None:
            for priority, share in enumerate(class_shares):
                self._table.set_class_share(priority, share)
        if seed is not None:
            self._table.seed(seed)
        if balance_epsilon is not None:
            self._table.set_balance(_in_range("balance_epsilon", balance_epsilon, 0.0, _EPSILON_MAX))
        if signal_age_max_s is not None:
            age_s = _in_range("signal_age_max_s", signal_age_max_s, 0.001, _SIGNAL_AGE_MAX_S)
            self._table.set_signal_age_max(round(age_s * 1000))

    @staticmethod
    def _open_table(
        max_accelerators: int, prefix_entries: int, shared_memory: str | None
    ) -> _native.NativeTable:
        if shared_memory is None:
            return _native.NativeTable(max_accelerators, prefix_entries=prefix_entries)
        try:
            return _native.NativeTable(
                max_accelerators, prefix_entries=prefix_entries, shared_name=shared_memory
            )
        except _errors.SharedMemoryError as error:
            if error.status != "shared_exists":
                raise
            return _native.NativeTable(max_accelerators, shared_name=shared_memory, attach=True)

    # ---- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Releases the table (the shared segment's name stays; see `unlink_shared`). Requests
        still in flight are forgotten; in a shared table their load stays counted."""
        self._table.close()
        self._handle = 0  # never a handle: the fast path's calls are refused from now on
        # Back to the methods (which see the 0 above); a builtin kept elsewhere has the closed
        # handle, which the core refuses.
        self.__dict__.pop("route_request", None)
        self.__dict__.pop("complete", None)

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- owners (doc/reclaim.md) -----------------------------------------------------------------

    @property
    def owner(self) -> int:
        """This router's owner index in its shared table (0: unowned)."""
        return self._table.owner_info()[1]

    def reclaim_owner(self, owner: int) -> tuple[int, int]:
        """Gives back everything owner `owner` still holds, after its process died (or its router
        closed while holding reservations): returns (reservations, cost) given back; (0, 0) if it
        held nothing. Exact whatever instruction the owner died at. Refused (InvalidArgumentError
        with status "owner_alive") for this router's own owner or an owner whose process is alive
        and attached; a supervisor reaps a dead child (waitpid) before reclaiming it."""
        return self._table.reclaim_owner(owner)

    def owner_held(self, owner: int) -> tuple[int, int]:
        """What owner `owner` holds now: (reservations, cost), a snapshot for tests and metrics."""
        return self._table.owner_held(owner)

    def release_generation(self) -> int:
        """A number that moves whenever capacity may have been freed anywhere in the table: every
        release, capacity or state change, and reclaim, by any process. A worker with queued
        requests compares it with the value it last saw instead of retrying blindly."""
        return self._table.release_generation()

    def wait_release(self, seen: int, timeout_s: float) -> int:
        """Blocks (without the GIL, at most `timeout_s`, up to 1 s) until the release generation
        differs from `seen`; returns it (still `seen` on a timeout). For a thread that serves a
        worker's queue: a futex on the shared table, woken by releases in any process."""
        timeout_ms = max(0, min(_native.RELEASE_WAIT_MS_MAX, round(timeout_s * 1000)))
        return self._table.wait_release(seen, timeout_ms)

    # ---- accelerators --------------------------------------------------------------------------

    def add_accelerator(self, accelerator: Accelerator) -> None:
        """Adds an accelerator; DuplicateBackendError (a ValueError) if its id is present."""
        weight_milli = _native.weight_to_milli(accelerator.weight)
        slot = self._table.add(accelerator.id, accelerator.capacity, weight_milli)
        self._ids_by_slot[slot] = accelerator.id
        self._slots_by_id[accelerator.id] = slot
        self._accelerators[accelerator.id] = accelerator
        accelerator._router = self

    def remove_accelerator(self, accelerator_id: int) -> None:
        """Removes an accelerator at once: it gets no new requests; requests in flight on it may
        still be completed (its slot is reused only after the last one)."""
        self._table.remove(self._slot(accelerator_id))
        self._forget(accelerator_id)

    def forget_accelerator(self, accelerator_id: int) -> None:
        """Forgets an accelerator that another process removed from the shared table: it leaves
        this router's pools, and its slot is looked up again when a new accelerator reuses it.
        The table is not touched. A no-op for an accelerator this router never knew."""
        slot = self._slots_by_id.get(accelerator_id)
        if slot is not None and self._ids_by_slot[slot] == accelerator_id:
            self._ids_by_slot[slot] = None
        self._forget(accelerator_id)

    def _forget(self, accelerator_id: int) -> None:
        self._slots_by_id.pop(accelerator_id, None)
        for name, (members, strategy, _pool) in list(self._pools.items()):
            if accelerator_id in members:
                remaining = tuple(member for member in members if member != accelerator_id)
                self._pools[name] = (remaining, strategy, _native.Pool([self._slot(m) for m in remaining]))
        accelerator = self._accelerators.pop(accelerator_id, None)
        if accelerator is not None:
            accelerator._router = None

    def set_state(self, accelerator_id: int, state: str) -> None:
        """ "active", "draining" (finish what is in flight, take nothing new) or "down"."""
        if state not in _STATES:
            raise ValueError(f"unknown state {state!r}; valid states: {', '.join(_STATES)}")
        info = self._record_of(accelerator_id)
        self._table.update(info.slot, info.capacity, info.weight_milli, _STATES[state])

    def drain(self, accelerator_id: int) -> None:
        self.set_state(accelerator_id, "draining")

    def update_accelerator(
        self, accelerator_id: int, *, capacity: int | None = None, weight: float | None = None
    ) -> None:
        """Changes capacity and/or weight while routing goes on."""
        info = self._record_of(accelerator_id)
        new_capacity = info.capacity if capacity is None else _native.check_capacity(capacity)
        weight_milli = info.weight_milli if weight is None else _native.weight_to_milli(weight)
        self._table.update(info.slot, new_capacity, weight_milli, State(info.state))
        accelerator = self._accelerators.get(accelerator_id)
        if accelerator is not None:
            accelerator.capacity = new_capacity
            accelerator.weight = weight_milli / 1000

    # ---- pools ---------------------------------------------------------------------------------

    def set_pool(self, name: str, accelerator_ids: Iterable[int], strategy: str | None = None) -> None:
        """Defines (or redefines) a named subset of accelerators, e.g. those serving one model,
        routed with `strategy` (default: the router's). An accelerator may be in several pools;
        its load is counted once, in the table."""
        members = tuple(dict.fromkeys(accelerator_ids))
        slots = [self._slot(member) for member in members]
        chosen = self._strategy if strategy is None else strategy_id(strategy)
        self._pools[name] = (members, chosen, _native.Pool(slots))

    def remove_pool(self, name: str) -> None:
        del self._pools[name]

    def _pool(self, name: str) -> tuple[int, _native.Pool]:
        """The strategy number and native pool of pool `name`."""
        try:
            _members, strategy, native_pool = self._pools[name]
        except KeyError:
            raise KeyError(f"no pool named {name!r}; pools: {sorted(self._pools)}") from None
        return strategy, native_pool

    @property
    def pools(self) -> dict[str, list[int]]:
        """Pool name -> member accelerator ids."""
        return {name: list(members) for name, (members, _strategy, _pool) in self._pools.items()}

    def set_signals(
        self, accelerator_id: int, *, queue_depth: int, kv_usage: float = 0.0, read_at: float | None = None
    ) -> None:
        """Records the load an accelerator reports itself (waiting requests, KV-cache use 0 to 1),
        read at `read_at` (`time.monotonic()`, default now). `queue_aware` adds it to our own
        count while it is fresher than `signal_age_max_s` (default 5 s) and ignores it after."""
        if type(queue_depth) is not int or not 0 <= queue_depth < 2**32:
            raise ValueError(f"queue_depth must be an int in 0..2**32-1, got {queue_depth!r}")
        if not 0.0 <= kv_usage <= 1.0:
            raise ValueError(f"kv_usage must be in 0..1, got {kv_usage!r}")
        stamp = time.monotonic() if read_at is None else read_at
        self._table.set_signals(self._slot(accelerator_id), queue_depth, kv_usage, max(1, int(stamp * 1000)))

    def set_ring_name(self, accelerator_id: int, name: str | bytes | None) -> None:
        """Places the accelerator on consistent_hash's ring by `name` (e.g. its URL) instead of
        by its id; None places it by id again. Routers (replicas, restarts) that give the same
        accelerators the same names agree on every key's owner, whatever ids and order they used;
        only this accelerator's keys move."""
        key = 0 if name is None else affinity_key_hash(name) or 1  # 0 means "by id" in the core
        self._table.set_ring_key(self._slot(accelerator_id), key)

    def set_batch_slots(self, accelerator_id: int, batch_slots: int) -> None:
        """How many requests the accelerator's engine runs at once (its batch slots, e.g. vLLM's
        `max_num_seqs`); 0 (the default) means not known. `least_ttft` then counts only the
        requests beyond them as a queue that delays a new request's first token; requests that
        fit in the batch beside it count a little (1/batch_slots each)."""
        if type(batch_slots) is not int or not 0 <= batch_slots < 2**32:
            raise ValueError(f"batch_slots must be an int in 0..2**32-1, got {batch_slots!r}")
        self._table.set_batch_slots(self._slot(accelerator_id), batch_slots)

    def set_batch_timing(self, accelerator_id: int, slot_free_at: float | None, service_s: float) -> None:
        """When the accelerator's full batch is next expected to free a slot (`slot_free_at`, on
        the `time.monotonic()` clock, as the caller's books of the requests it sent there say)
        and how long one request's service takes there (`service_s`); None or a service of 0
        means not known. `least_ttft` then counts the wait for that slot as the part of a
        service still to run, instead of a whole one: a conversation waits for a slot that frees
        in a moment rather than leave its cache. A time that has passed is trusted less and less,
        and not at all half a service later (the request due then may have waited in the
        engine's queue). Needs `set_batch_slots`."""
        if not (isinstance(service_s, int | float) and math.isfinite(service_s) and 0 <= service_s <= 86_400):
            raise ValueError(f"service_s must be a number of seconds in 0..86400, got {service_s!r}")
        if slot_free_at is not None and not (
            isinstance(slot_free_at, int | float)
            and math.isfinite(slot_free_at)
            and 0 <= slot_free_at < 2**53 / 1000
        ):
            raise ValueError(f"slot_free_at must be a time.monotonic() time or None, got {slot_free_at!r}")
        if slot_free_at is None or service_s == 0:
            free_ms = service_ms = 0
        else:
            free_ms, service_ms = max(1, round(slot_free_at * 1000)), max(1, round(service_s * 1000))
        self._table.set_batch_timing(self._slot(accelerator_id), free_ms, service_ms)

    @property
    def accelerators(self) -> list[int]:
        """Ids of the accelerators in the table (in shared mode: added by any process)."""
        return [info.id for info in self._table.snapshot() if info.state != State.RETIRED]

    # ---- routing -------------------------------------------------------------------------------

    def route_request(
        self,
        request: Request,
        *,
        pool: str | None = None,
        affinity_key: int | str | bytes | None = None,
        prefix_hashes: Sequence[int] | None = None,
    ) -> int | None:
        """Routes `request` (within `pool` if given; with a session key for consistent_hash or
        prompt prefix hashes for prefix_affinity); returns the accelerator id, or None when
        nothing fits. The request's cost stays reserved until `complete(request)`.

        A request id is any hashable; ints in 0..2**64-1 routed without options take the fast
        path, one foreign call that also records the request in the core (per process: on a
        shared table, complete it in the process that routed it)."""
        request_id, cost, priority = request.id, request.cost, request.priority
        # Every check of the fast path in one condition: this method is the seed API's per-call
        # cost, and each line here costs about as much as the decision in the core.
        if (
            type(request_id) is int
            and 0 <= request_id <= REQUEST_ID_MAX
            and 0 < cost <= COST_MAX
            and 0 <= priority < CLASSES_COUNT
            and pool is None
            and affinity_key is None
            and prefix_hashes is None
        ):
            if self._in_flight and request_id in self._in_flight:
                raise _already_in_flight(request_id)
            try:
                result = self._route(
                    self._handle, self._strategy, request_id & 0xFFFF_FFFF, request_id >> 32, cost, priority
                )
            except _native.CallArgumentError:
                _refuse_request(cost, priority)  # a float cost or priority: ctypes cannot pass it
            if result >= 0:
                return result  # the accelerator's id, from the table
            if result == ROUTE_NONE:
                return None
            if result <= ROUTE_SLOT_BASE:  # an id of 2**31 or more: named by its slot
                return int(self._table.read(ROUTE_SLOT_BASE - result).id)
            _native.raise_route_refusal(result, request_id)
        return self._route_recorded_here(request, pool, affinity_key, prefix_hashes)

    def _route_recorded_here(
        self,
        request: Request,
        pool: str | None,
        affinity_key: int | str | bytes | None,
        prefix_hashes: Sequence[int] | None,
    ) -> int | None:
        """`route_request` for what the core does not record (ids that are not ints in range,
        pools, affinity): the reservation is kept in `_in_flight`."""
        request_id, cost, priority = request.id, request.cost, request.priority
        if request_id in self._in_flight or self._recorded_in_core(request_id):
            raise _already_in_flight(request_id)
        if affinity_key is None and prefix_hashes is None:
            ticket = self.acquire_slot(cost, priority, pool=pool)
        else:
            ticket, _affinity, _matched = self.acquire_slot_affine(
                cost, priority, pool=pool, affinity_key=affinity_key, prefix_hashes=prefix_hashes
            )
        if ticket is None:
            return None
        self._in_flight[request_id] = (ticket, cost, time.perf_counter_ns())
        return self._id_of(ticket & TICKET_SLOT_MASK)

    def complete(self, request: Request | object, *, ok: bool = True, latency_s: float | None = None) -> None:
        """Releases a request routed with `route_request` (pass the Request or its id)."""
        request_id = request.id if isinstance(request, Request) else request
        key = _core_key(request_id)
        if key is not None:
            latency_us = -1 if latency_s is None else max(0, int(latency_s * 1e6))
            if self._table.complete(key, ok, latency_us):
                return
        record = self._in_flight.pop(request_id, None)
        if record is None:
            raise KeyError(f"request {request_id!r} is not in flight")
        ticket, cost, started_ns = record
        self.release_slot(ticket, cost, _latency_us(started_ns, latency_s), ok)

    def acquire(
        self,
        cost: int = 1,
        priority: int = 0,
        *,
        pool: str | None = None,
        affinity_key: int | str | bytes | None = None,
        prefix_hashes: Sequence[int] | None = None,
    ) -> Lease | None:
        """Reserves `cost` on an accelerator chosen by the strategy (among `pool`'s members if
        given); None when nothing fits. `affinity_key` (consistent_hash) and `prefix_hashes`
        (prefix_affinity, see `prefix_hashes()`) steer the affinity strategies; the others
        ignore them."""
        if affinity_key is None and prefix_hashes is None:
            ticket = self.acquire_slot(cost, priority, pool=pool)
            if ticket is None:
                return None
            return Lease(self, ticket, self._id_of(ticket & TICKET_SLOT_MASK), cost)
        if affinity_key is None and self._discount_cached:
            ticket, affinity, matched, reserved = self.acquire_slot_priced(
                cost, priority, pool=pool, prefix_hashes=prefix_hashes
            )
            if ticket is None:
                return None
            return Lease(self, ticket, self._id_of(ticket & TICKET_SLOT_MASK), reserved, affinity, matched)
        ticket, affinity, matched = self.acquire_slot_affine(
            cost, priority, pool=pool, affinity_key=affinity_key, prefix_hashes=prefix_hashes
        )
        if ticket is None:
            return None
        return Lease(self, ticket, self._id_of(ticket & TICKET_SLOT_MASK), cost, affinity, matched)

    def acquire_on(self, accelerator_id: int, cost: int = 1, priority: int = 0) -> Lease | None:
        """Reserves `cost` on the given accelerator (chosen by your own policy); None if it is
        not active or cannot take it."""
        slot = self._slot(accelerator_id)
        ticket = self._table.acquire_on(slot, _native.check_cost(cost), _native.check_priority(priority))
        if ticket == SLOT_NONE:
            return None
        return Lease(self, ticket, accelerator_id, cost)

    @contextlib.contextmanager
    def lease(
        self,
        request: Request,
        *,
        pool: str | None = None,
        affinity_key: int | str | bytes | None = None,
        prefix_hashes: Sequence[int] | None = None,
    ) -> Iterator[int | None]:
        """`with router.lease(request) as accelerator_id:` routes the request and completes it on
        exit (failed if the block raised). The id is None when nothing fits."""
        lease = self.acquire(
            request.cost, request.priority, pool=pool, affinity_key=affinity_key, prefix_hashes=prefix_hashes
        )
        if lease is None:
            yield None
            return
        with lease:
            yield lease.accelerator_id

    def route_batch(self, requests: Sequence[Request]) -> list[int | None]:
        """Routes many requests in one native call per priority class; like `route_request` for
        each, in order. Complete them with `complete` or `complete_batch`."""
        in_core = self._table.requests_count() > 0
        for request in requests:
            if request.id in self._in_flight or (in_core and self._recorded_in_core(request.id)):
                raise _already_in_flight(request.id)
        results: list[int | None] = [None] * len(requests)
        for priority, indices in _group_by_priority(requests).items():
            costs = _native.int32_array([requests[i].cost for i in indices])
            tickets = _native.ticket_array(len(indices))
            self._table.acquire_batch(self._strategy, priority, costs, tickets)
            now = time.perf_counter_ns()
            for index, ticket in zip(indices, tickets, strict=True):
                if ticket != SLOT_NONE:
                    self._in_flight[requests[index].id] = (ticket, requests[index].cost, now)
                    results[index] = self._id_of(ticket & TICKET_SLOT_MASK)
        return results

    def complete_batch(self, requests: Iterable[Request | object], *, ok: bool = True) -> None:
        """Completes every routed request of `requests` (unrouted ones are skipped): those of
        `route_batch` in one native call, those `route_request` recorded in the core one by one."""
        in_core = self._table.requests_count() > 0
        records = []
        for request in requests:
            request_id = request.id if isinstance(request, Request) else request
            key = _core_key(request_id) if in_core else None
            if key is not None and self._table.complete(key, ok, -1):
                continue
            record = self._in_flight.pop(request_id, None)
            if record is not None:
                records.append(record)
        if not records:
            return
        now = time.perf_counter_ns()
        self._table.release_batch(
            _native.ticket_array([ticket for ticket, _cost, _started in records]),
            _native.int32_array([cost for _ticket, cost, _started in records]),
            _native.uint32_array([min((now - started) // 1000, 2**32 - 1) for _t, _c, started in records]),
            ok,
        )

    # ---- slots: the per-request fast path ------------------------------------------------------

    def acquire_slot(self, cost: int = 1, priority: int = 0, *, pool: str | None = None) -> int | None:
        """Like `acquire`, without a `Lease`: reserves `cost` and returns the reservation's
        ticket, an int naming the chosen slot and its incarnation (`id_of_slot` takes it), or
        None when nothing fits. Give it back with `release_slot`.

        For code that routes millions of requests in one process (the simulator, benchmarks): a
        `Lease` costs about as much as the decision itself. The caller pairs each acquire with
        one release of the same ticket and cost."""
        # One chained range check, no type checks: on this path they would cost as much as the
        # foreign call. A non-number fails the comparison; a float fails in the binding (ctypes
        # cannot pass it as a C int); both end in a clear InvalidArgumentError.
        try:
            valid = 0 < cost <= COST_MAX and 0 <= priority < CLASSES_COUNT
        except TypeError:
            valid = False
        if not valid:
            _refuse_request(cost, priority)
        if pool is None:
            ticket = self._table.acquire(self._strategy, cost, priority)
        else:
            strategy, native_pool = self._pool(pool)
            ticket = self._table.acquire_among(strategy, cost, priority, native_pool)
        return None if ticket == SLOT_NONE else ticket

    def acquire_slot_affine(
        self,
        cost: int = 1,
        priority: int = 0,
        *,
        pool: str | None = None,
        affinity_key: int | str | bytes | None = None,
        prefix_hashes: Sequence[int] | None = None,
    ) -> tuple[int | None, str | None, int]:
        """Like `acquire_slot`, with a session key and/or prompt prefix hashes (as `acquire`):
        returns (ticket or None, affinity, matched blocks). `affinity` says how the decision went
        ("hit", "miss", "overload", or None for a strategy without affinity), also when nothing
        fit; `matched` counts the prompt blocks the chosen accelerator had seen."""
        _native.check_cost(cost)
        _native.check_priority(priority)
        strategy, native_pool = self._strategy, None
        if pool is not None:
            strategy, native_pool = self._pool(pool)
        key = None if affinity_key is None else affinity_key_hash(affinity_key)
        hashes = None if prefix_hashes is None else _native.uint64_array(prefix_hashes)
        if strategy == _native.StrategyCode.LEAST_TTFT:
            # Priced with this router's block cost, never discounted: the cost reserved is `cost`.
            ticket, outcome, matched, _reserved = self._table.acquire_priced(
                strategy, cost, priority, hashes, native_pool, self._block_cost_milli, False
            )
        else:
            ticket, outcome, matched = self._table.acquire_affine(
                strategy, cost, priority, key, hashes, native_pool
            )
        return (None if ticket == SLOT_NONE else ticket), _OUTCOMES[outcome], matched

    def acquire_slot_priced(
        self,
        cost: int = 1,
        priority: int = 0,
        *,
        pool: str | None = None,
        prefix_hashes: Sequence[int] | None = None,
    ) -> tuple[int | None, str | None, int, int]:
        """Like `acquire_slot_affine` without a session key, priced: least_ttft values each
        uncached prompt block at the router's `block_cost`, and with `discount_cached` the
        reservation is `cost` less the value of the blocks the chosen accelerator has cached (at
        least 1). Returns (ticket or None, affinity, matched blocks, the cost reserved): release
        the ticket with exactly that cost."""
        _native.check_cost(cost)
        _native.check_priority(priority)
        strategy, native_pool = self._strategy, None
        if pool is not None:
            strategy, native_pool = self._pool(pool)
        hashes = None if prefix_hashes is None else _native.uint64_array(prefix_hashes)
        ticket, outcome, matched, reserved = self._table.acquire_priced(
            strategy, cost, priority, hashes, native_pool, self._block_cost_milli, self._discount_cached
        )
        return (None if ticket == SLOT_NONE else ticket), _OUTCOMES[outcome], matched, reserved

    def release_slot(self, ticket: int, cost: int, latency_us: int = 0, ok: bool = True) -> None:
        """Gives back a reservation of `acquire_slot`/`acquire_slot_affine`: the same ticket and
        cost, with the request's latency (µs, for the latency average) and whether it succeeded.

        The ticket names the slot's incarnation: if the accelerator was removed and its slot
        reused since, the release is refused (StaleReleaseError, counters unchanged) instead of
        landing on the new accelerator. Within one incarnation the core keeps one count per
        slot, not per reservation: it refuses a release of more than the slot holds
        (ReleaseMismatchError, counters unchanged), e.g. a second release on an otherwise idle
        slot, but cannot tell two reservations of one slot apart."""
        # Range checks only, as in `acquire_slot`: ctypes would pass 2**32 + 1 as 1.
        try:
            valid = 0 <= ticket < _TICKET_END and 0 < cost <= COST_MAX and latency_us >= 0
        except TypeError:
            valid = False
        if not valid:
            _refuse_release(ticket, cost, latency_us)
        self._table.release(ticket, cost, latency_us, ok)

    def slot_of(self, accelerator_id: int) -> int:
        """The core's slot of an accelerator (stable while it is in the table); UnknownBackendError
        if there is none."""
        return self._slot(accelerator_id)

    def id_of_slot(self, slot: int) -> int:
        """The id of the accelerator in `slot`, or in the slot a ticket of `acquire_slot` names
        (in shared mode, also one another process added); UnknownBackendError for a slot that
        holds none."""
        if type(slot) is not int or not 0 <= slot < _TICKET_END:
            raise _errors.UnknownBackendError("unknown_backend", f"no accelerator in slot {slot!r}")
        index = slot & TICKET_SLOT_MASK
        if index >= len(self._ids_by_slot):
            raise _errors.UnknownBackendError("unknown_backend", f"no accelerator in slot {slot!r}")
        return self._id_of(index)

    # ---- observation ---------------------------------------------------------------------------

    def load(self, accelerator_id: int) -> int:
        """Cost units in flight on the accelerator."""
        return int(self._record_of(accelerator_id).cost_in_flight)

    def stats(self) -> list[AcceleratorStats]:
        """Every accelerator's counters, read from the core in one call."""
        return [_stats_of(info) for info in self._table.snapshot()]

    def accelerator_stats(self, accelerator_id: int) -> AcceleratorStats:
        return _stats_of(self._record_of(accelerator_id))

    @property
    def in_flight(self) -> int:
        """Requests routed with `route_request`/`route_batch` and not yet completed."""
        return len(self._in_flight) + self._table.requests_count()

    def _recorded_in_core(self, request_id: object) -> bool:
        key = _core_key(request_id)
        return key is not None and self._table.request_ticket(key) is not None

    # ---- ids and slots -------------------------------------------------------------------------

    def _slot(self, accelerator_id: int) -> int:
        slot = self._slots_by_id.get(accelerator_id)
        if slot is None:
            try:
                slot = self._table.find(accelerator_id)
            except _errors.UnknownBackendError:
                raise _errors.UnknownBackendError(
                    "unknown_backend", f"no accelerator with id {accelerator_id!r}"
                ) from None
            self._slots_by_id[accelerator_id] = slot
            self._ids_by_slot[slot] = accelerator_id
        return slot

    def _id_of(self, slot: int) -> int:
        """The id in `slot`, a slot in range (from the core, or checked by `id_of_slot`)."""
        accelerator_id = self._ids_by_slot[slot]
        if accelerator_id is None:  # Added by another process sharing the table.
            self._refresh_ids()
            accelerator_id = self._ids_by_slot[slot]
            if accelerator_id is None:
                raise _errors.UnknownBackendError("unknown_backend", f"no accelerator in slot {slot}")
        return accelerator_id

    def _refresh_ids(self) -> None:
        for info in self._table.snapshot():
            if info.state == State.RETIRED:
                # Removed: its slot will hold another accelerator, which a later refresh maps.
                continue
            self._ids_by_slot[info.slot] = info.id
            self._slots_by_id[info.id] = info.slot

    def _record_of(self, accelerator_id: int) -> SlotRecord:
        info = self._table.read(self._slot(accelerator_id))
        if info.id != accelerator_id or info.state == State.RETIRED:
            raise _errors.UnknownBackendError("unknown_backend", f"no accelerator with id {accelerator_id!r}")
        return info


def _already_in_flight(request_id: object) -> ValueError:
    return ValueError(f"request {request_id!r} is already in flight; complete it first")


def _core_key(request_id: object) -> int | None:
    """The int the core records `request_id` under, if any: an int in 0..2**64-1, or an id equal
    to one with the same hash (a numpy integer, 1.0), since `_in_flight` would match those to it."""
    if type(request_id) is int:
        return request_id if 0 <= request_id <= REQUEST_ID_MAX else None
    try:
        key: int = int(request_id)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return None
    if not 0 <= key <= REQUEST_ID_MAX or key != request_id or hash(key) != hash(request_id):
        return None
    return key


def _refuse_request(cost: int, priority: int) -> NoReturn:
    """Raises the clear error for arguments that failed `acquire_slot`'s range check."""
    _native.check_cost(cost)
    _native.check_priority(priority)
    raise AssertionError("unreachable: one of the checks raises")


_TICKET_END: Final = 2**64
"""Tickets are u64 (`incarnation << 32 | slot`)."""


def _check_owner(owner: int | None, shared_memory: str | None) -> None:
    if owner is None:
        return
    if shared_memory is None:
        raise _errors.InvalidArgumentError(
            "invalid_argument", "owner is only valid with shared_memory (a private table has no owners)"
        )
    if type(owner) is not int or not 1 <= owner < _native.OWNERS_MAX:
        raise _errors.InvalidArgumentError(
            "invalid_argument", f"owner must be an int in 1..{_native.OWNERS_MAX - 1}, got {owner!r}"
        )


def _refuse_release(ticket: int, cost: int, latency_us: int) -> NoReturn:
    """Raises the clear error for arguments that failed `release_slot`'s range check."""
    if type(ticket) is not int or not 0 <= ticket < _TICKET_END:
        raise _errors.UnknownBackendError("unknown_backend", f"no accelerator in slot {ticket!r}")
    _native.check_cost(cost)
    raise _errors.InvalidArgumentError(
        "invalid_argument", f"latency_us must be an int >= 0, got {latency_us!r}"
    )


def _latency_us(started_ns: int, latency_s: float | None) -> int:
    """A release's latency in µs: the caller's `latency_s`, else the time since `started_ns`."""
    if latency_s is None:
        return (time.perf_counter_ns() - started_ns) // 1000
    return max(0, int(latency_s * 1e6))


_BLOCK_COST_DEFAULT_MILLI: Final = 50
"""The core's default price of a prompt block: 0.05 cost units (zig/strategies.zig)."""


_EPSILON_MAX: Final = 10.0
"""The core's bound on the bounded-load slack."""
_SIGNAL_AGE_MAX_S: Final = 4_294_967.0
"""About 49 days: the core keeps the age in milliseconds in 32 bits, so a larger value would wrap."""


def _in_range(name: str, value: float, low: float, high: float) -> float:
    """`value` if it is a number in `low..high`; else InvalidArgumentError naming the option (never
    a value that ctypes would wrap into the core's unsigned integers)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _errors.InvalidArgumentError(
            "invalid_argument", f"{name} must be a number in {low:g}..{high:g}, got {value!r}"
        )
    return float(value)


def _block_cost_milli(block_cost: float | None) -> int:
    """A block cost in cost units as the core's thousandths; a clear error out of 0 … 10^6."""
    if block_cost is None:
        return _BLOCK_COST_DEFAULT_MILLI
    if isinstance(block_cost, bool) or not isinstance(block_cost, int | float) or not 0 <= block_cost <= 1e6:
        raise ValueError(
            f"block_cost must be a number in 0..1000000 (cost units per block), got {block_cost!r}"
        )
    return round(block_cost * 1000)


def _group_by_priority(requests: Sequence[Request]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.priority, []).append(index)
    return groups


def _stats_of(info: SlotRecord) -> AcceleratorStats:
    return AcceleratorStats(
        id=info.id,
        state=State(info.state).name.lower(),
        capacity=info.capacity,
        weight=info.weight_milli / 1000,
        load=info.cost_in_flight,
        requests_in_flight=info.count_in_flight,
        routed=info.routed_total,
        completed=info.completed_total,
        failed=info.failed_total,
        latency_ewma_s=info.latency_us_ewma / 1e6,
    )
