"""The discrete-event simulation: requests arrive, the native core routes them, accelerators serve
them with continuous batching, and every completion is released back to the core.

Events live in one `heapq` ordered by (time, sequence number), so equal times keep a fixed order and
a seed replays exactly. Each accelerator keeps a *progress clock*: the work every request in its
batch has received so far (all requests in a batch advance at the same rate, see `_model`). A
request's first token and its end are milestones on that clock, kept in a per-accelerator heap; the
global heap holds only each accelerator's next milestone, rescheduled (and the old entry left behind
as stale, recognised by a version number) whenever the batch size changes the rate. So an event
costs O(log n) whatever the batch sizes.

Policies, chosen to match what a client of the real router sees:
- When no accelerator can take a request, the core says so and the request is *rejected* (the proxy
  answers 503). With `retries > 0` it is tried again after `backoff_s`, doubling each time, and
  rejected only when the retries run out; its latency includes the waiting.
- When an accelerator goes down it receives nothing new (its state is `down` in the core). With
  `on_failure="fail"` (the default: a crashed server loses its work) the requests it held fail at
  that instant and are released as failed; with `"finish"` they run to completion (a graceful
  shutdown). Failed requests are not retried.
- A `SpeedChange` slows an accelerator by its factor for a while (its work in progress too); with
  learned speed (`learn_speed`, on for least_ttft by default) the router learns each
  accelerator's pace from its requests' first tokens and ends (`irmiddleware._speed`) and sets the
  core's weights from it once per simulated second, as the proxy does.
- With a `ChatWorkload`, each arrival starts a session; its next turn arrives a think time after
  the previous answer ended. A session whose turn is rejected or fails ends there (the user gives
  up). Every request carries its session id (`affinity_key`) and its prompt's block hashes
  (`prefix_hashes`) to the core, whatever the strategy: the strategies without affinity ignore them.
  A crashed accelerator (`on_failure="fail"`) loses its prefix cache.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from irmiddleware import Accelerator, Router
from irmiddleware._prefix_cache import PrefixCache
from irmiddleware._speed import SpeedBook
from irmiddleware.sim._chat import ChatWorkload, Conversation, chat_requests_max
from irmiddleware.sim._model import Arrival, ArrivalProcess, Failure, Fleet, Job, SpeedChange, Workload
from irmiddleware.sim._stats import Affinity, Outage, Percentiles, StrategyResult

DEFAULT_STRATEGIES: Final = ("round_robin", "least_connections", "p2c")
# The default for workloads with sessions and shared prefixes, where affinity can pay.
AFFINITY_STRATEGIES: Final = (*DEFAULT_STRATEGIES, "consistent_hash", "prefix_affinity")

# Event kinds, in the order they are handled when times tie (the sequence number decides first).
_ARRIVAL, _MILESTONE, _RETRY, _DOWN, _UP, _TURN, _SPEED = range(7)
# Learned speed sets the core's weights this often (simulated seconds), as the proxy's default.
_SPEED_APPLY_S = 1.0
# Milestones closer than this (in work-seconds) are due together: float rounding, not real gaps.
_TIE_S = 1e-9
# Rebuild the event heap without stale entries when it outgrows live work by this factor.
_STALE_FACTOR = 4
_PROGRESS_EVERY = 10_000

Progress = Callable[[str, int, int], None]
"""Called as progress(strategy, requests arrived so far, requests in total)."""


@dataclass(frozen=True)
class Scenario:
    """Everything a run needs except the strategy; the same scenario replays the same requests.

    With a `ChatWorkload`, `arrivals` are session starts and `requests` counts sessions (each sends
    one request per turn). `balance_epsilon` is the core's bounded-load slack and
    `prefix_index_entries` the size of its prefix index (consistent_hash and prefix_affinity)."""

    fleet: Fleet
    workload: Workload
    arrivals: ArrivalProcess
    requests: int
    failures: tuple[Failure, ...] = ()
    on_failure: Literal["fail", "finish"] = "fail"
    retries: int = 0
    backoff_s: float = 0.05
    seed: int = 0
    balance_epsilon: float = 0.25
    prefix_index_entries: int = 1 << 18
    speed_changes: tuple[SpeedChange, ...] = ()
    learn_speed: bool | None = None
    """Learned speed sets the core's weights; None: for least_ttft only."""
    block_cost: float | None = None
    """least_ttft's price of an uncached prompt block, in cost units (None: the core's default)."""

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise ValueError("requests must be >= 1")
        if self.retries < 0 or self.backoff_s < 0:
            raise ValueError("retries and backoff_s must be >= 0")
        if self.on_failure not in ("fail", "finish"):
            raise ValueError(f"on_failure must be 'fail' or 'finish', got {self.on_failure!r}")
        if not 0 <= self.balance_epsilon <= 10:
            raise ValueError("balance_epsilon must be in 0..10")
        _check_failures(self.failures, len(self.fleet))
        for change in self.speed_changes:
            if not 0 <= change.accelerator < len(self.fleet):
                last = len(self.fleet) - 1
                raise ValueError(
                    f"speed change names accelerator {change.accelerator}; the fleet has 0..{last}"
                )

    @property
    def requests_max(self) -> int:
        """The most requests the scenario can send (sessions send several)."""
        if isinstance(self.workload, ChatWorkload):
            return chat_requests_max(self.workload, self.requests)
        return self.requests


def _check_failures(failures: Sequence[Failure], fleet_size: int) -> None:
    by_accelerator: dict[int, list[Failure]] = {}
    for failure in failures:
        if not 0 <= failure.accelerator < fleet_size:
            raise ValueError(
                f"failure names accelerator {failure.accelerator}; the fleet has 0..{fleet_size - 1}"
            )
        by_accelerator.setdefault(failure.accelerator, []).append(failure)
    for windows in by_accelerator.values():
        windows.sort(key=lambda failure: failure.down_s)
        for earlier, later in itertools.pairwise(windows):
            if earlier.up_s is None or earlier.up_s > later.down_s:
                raise ValueError(f"failure windows of accelerator {earlier.accelerator} overlap")


def simulate(scenario: Scenario, strategy: str, *, progress: Progress | None = None) -> StrategyResult:
    """Runs `scenario` with `strategy` (a native strategy name) and measures it."""
    return _Simulation(scenario, strategy, progress).run()


def compare(
    scenario: Scenario, strategies: Iterable[str] | None = None, *, progress: Progress | None = None
) -> list[StrategyResult]:
    """Runs the same scenario (same requests, same arrival times) once per strategy; by default
    `DEFAULT_STRATEGIES`, or `AFFINITY_STRATEGIES` for a chat workload."""
    if strategies is None:
        strategies = default_strategies(scenario)
    return [simulate(scenario, strategy, progress=progress) for strategy in strategies]


def default_strategies(scenario: Scenario) -> tuple[str, ...]:
    """Without sessions or shared prefixes the affinity strategies only repeat p2c and least
    connections (their fallbacks), so they are compared on chat workloads only."""
    return AFFINITY_STRATEGIES if isinstance(scenario.workload, ChatWorkload) else DEFAULT_STRATEGIES


class _NativeFleet:
    """The fleet in a real `Router`; the only code here that touches the router.

    Per-request calls use the router's slot-level calls (`acquire_slot`, `release_slot`): a
    `Lease` per request would cost more than the decision itself at a million requests.
    """

    def __init__(self, scenario: Scenario, strategy: str) -> None:
        fleet = scenario.fleet
        self.router = Router(
            strategy,
            max_accelerators=len(fleet),
            seed=scenario.seed,
            balance_epsilon=scenario.balance_epsilon,
            prefix_index_entries=scenario.prefix_index_entries,
            block_cost=scenario.block_cost,
        )
        for index, capacity in enumerate(fleet.capacities):
            self.router.add_accelerator(Accelerator(index, capacity))
        learn = scenario.learn_speed if scenario.learn_speed is not None else strategy == "least_ttft"
        self.speed = SpeedBook() if learn else None
        self.weights = [1.0] * len(fleet)
        self._applied_s = 0.0
        # Accelerator ids are fleet indices. A reservation's ticket names its accelerator's slot and
        # incarnation; nothing is removed during a run, so each accelerator keeps one ticket value:
        # learnt on its first decision, then a dict hit one way and a list index the other.
        self.index_by_ticket: dict[int, int] = {}
        self.ticket_by_index = [-1] * len(fleet)
        self.outcomes: dict[str | None, int] = {}
        self._acquire = self.router.acquire_slot
        self._acquire_affine = self.router.acquire_slot_affine
        self._release = self.router.release_slot

    def acquire(self, cost: int) -> int:
        """The chosen accelerator's index, or -1 when nothing fits."""
        ticket = self._acquire(cost)
        return -1 if ticket is None else self._index_of(ticket)

    def acquire_affine(self, cost: int, session: int, hashes: list[int]) -> int:
        """Like `acquire`, with the session key and the prompt's block hashes; counts outcomes."""
        ticket, affinity, _matched = self._acquire_affine(
            cost, affinity_key=session, prefix_hashes=hashes if hashes else None
        )
        self.outcomes[affinity] = self.outcomes.get(affinity, 0) + 1
        return -1 if ticket is None else self._index_of(ticket)

    def _index_of(self, ticket: int) -> int:
        index = self.index_by_ticket.get(ticket)
        if index is None:
            index = self.router.id_of_slot(ticket)
            self.index_by_ticket[ticket] = index
            self.ticket_by_index[index] = ticket
        return index

    def release(self, index: int, job: Job, latency_s: float, ok: bool) -> None:
        self._release(self.ticket_by_index[index], job.cost, int(latency_s * 1e6), ok)

    def observe(self, index: int, prefill: bool, work_s: float, duration_s: float, now: float) -> bool:
        """Tells learned speed (when on) that `work_s` of prefill (or decode) took `duration_s`;
        True when the core's weights were just set from it (once per simulated second)."""
        speed = self.speed
        if speed is None:
            return False
        if prefill:
            speed.first_byte(index, work_s, duration_s, now)
        else:
            speed.streamed(index, work_s, duration_s, now)
        if now - self._applied_s < _SPEED_APPLY_S:
            return False
        self._applied_s = now
        weights = speed.weights(dict.fromkeys(range(len(self.weights)), 1.0), now)
        for index_, weight in weights.items():
            if abs(weight - self.weights[index_]) > 0.001:
                self.router.update_accelerator(index_, weight=weight)
                self.weights[index_] = self.router.accelerator_stats(index_).weight
        return True

    def set_down(self, index: int, down: bool) -> None:
        self.router.set_state(index, "down" if down else "active")

    def routed(self, index: int) -> int:
        return self.router.accelerator_stats(index).routed

    def check_idle(self) -> None:
        """Every acquire was released: the core's in-flight counters are back to zero."""
        busy = [stats.id for stats in self.router.stats() if stats.load or stats.requests_in_flight]
        if busy:
            raise RuntimeError(f"simulation ended with load still in flight on accelerators {busy[:10]}")

    def close(self) -> None:
        self.router.close()


class _Request:
    __slots__ = (
        "accelerator",
        "arrival_s",
        "attempts",
        "conversation",
        "first_token_s",
        "hashes",
        "job",
        "started_s",
    )

    def __init__(self, arrival_s: float, job: Job, conversation: Conversation | None = None) -> None:
        self.arrival_s = arrival_s
        self.started_s = arrival_s
        self.job = job
        self.accelerator = -1
        self.attempts = 0
        self.first_token_s = math.nan
        self.conversation = conversation
        self.hashes: list[int] = []


class _Chat:
    """Sessions and prefix caches for a `ChatWorkload`: builds each turn's request, charges its
    prefill for the uncached blocks only, and counts cache hits."""

    def __init__(self, workload: ChatWorkload, fleet: Fleet) -> None:
        self.workload = workload
        self.caches = [PrefixCache(workload.cache_blocks(capacity)) for capacity in fleet.capacities]
        self.sessions = 0
        self.prompt_blocks = self.cached_blocks = 0

    def first_turn(self, arrival_s: float, rng: random.Random) -> _Request:
        conversation = Conversation(self.sessions, self.workload.session(rng), self.workload)
        self.sessions += 1
        return self._turn(arrival_s, conversation)

    def next_turn(self, now: float, request: _Request) -> _Request | None:
        """The session's next request (arriving after the user's think time), if any."""
        conversation = request.conversation
        assert conversation is not None
        think_s = conversation.plan.turns[conversation.turn].think_s
        conversation.turn += 1
        if conversation.turn >= len(conversation.plan.turns):
            return None
        return self._turn(now + think_s, conversation)

    def _turn(self, arrival_s: float, conversation: Conversation) -> _Request:
        turn = conversation.plan.turns[conversation.turn]
        request = _Request(
            arrival_s, self.workload.job(turn.prompt_tokens, turn.output_tokens, 0), conversation
        )
        request.hashes = conversation.blocks(turn.prompt_tokens, self.workload.block_tokens)
        return request

    def start(self, index: int, request: _Request) -> None:
        """The accelerator reuses its cached prefix and caches the rest of the prompt."""
        cache, hashes, job = self.caches[index], request.hashes, request.job
        cached = cache.cached_prefix(hashes)
        self.prompt_blocks += len(hashes)
        self.cached_blocks += cached
        request.job = self.workload.job(
            job.prompt_tokens, job.output_tokens, cached * self.workload.block_tokens
        )
        cache.store(hashes)

    def end(self, index: int, request: _Request) -> None:
        """The answer's blocks are cached too: the next turn's prompt starts with them."""
        conversation, job = request.conversation, request.job
        assert conversation is not None
        tokens = job.prompt_tokens + job.output_tokens
        self.caches[index].store(conversation.blocks(tokens, self.workload.block_tokens))


# (time, sequence, kind, accelerator or failure index, version, request)
_Event = tuple[float, int, int, int, int, "_Request | None"]
# (progress-clock target, sequence, is the end (else the first token), request)
_Milestone = tuple[float, int, bool, _Request]


class _Simulation:
    def __init__(self, scenario: Scenario, strategy: str, progress: Progress | None) -> None:
        fleet = scenario.fleet
        count = len(fleet)
        self.scenario = scenario
        self.strategy = strategy
        self.progress = progress
        self.native = _NativeFleet(scenario, strategy)
        workload = scenario.workload
        self.chat = _Chat(workload, fleet) if isinstance(workload, ChatWorkload) else None
        self.capacities = fleet.capacities
        self.active_capacity = sum(fleet.capacities)
        self.cost_total = 0  # cost in flight over the fleet, for the bounded-load check
        self.bound_excess_max = -math.inf  # most cost units any admission put above the bound
        self.speeds = list(fleet.speeds)
        self.down = [False] * count
        self._weighted_capacity = float(sum(fleet.capacities))
        self.slowdown = fleet.batch_slowdown
        self.clock = [0.0] * count  # progress clock: work-seconds each running request has received
        self.updated_s = [0.0] * count  # when the clock was last brought up to date
        self.running = [0] * count
        self.cost_running = [0] * count
        self.busy_area = [0.0] * count  # integral of cost in flight over time, for utilisation
        self.version = [0] * count  # the current next-milestone event of each accelerator
        self.milestones: list[list[_Milestone]] = [[] for _ in range(count)]
        self.events: list[_Event] = []
        self.sequence = itertools.count()
        self.streams_tokens = scenario.workload.streams_tokens
        self.arrival_stream: Iterator[Arrival] = scenario.arrivals.arrivals(
            random.Random(f"{scenario.seed}/arrivals")
        )
        self.jobs_rng = random.Random(f"{scenario.seed}/jobs")
        self.arrived = self.completed = self.rejected = self.failed = self.retries = self.output_tokens = 0
        self.end_s = 0.0
        self.arrivals_end_s = 0.0
        self.completed_by_arrivals_end = 0
        self.latencies = array("d")
        self.ttfts = array("d")
        self.routed_at_down: dict[int, int] = {}
        self.outages: list[Outage] = []
        self.routed_s = array("d")
        self.routed_to = array("i")

    # ---- the loop ------------------------------------------------------------------------------

    def run(self) -> StrategyResult:
        try:
            self._schedule_failures()
            self._schedule_next_arrival()
            self._loop()
            self._finish()
            return self._result()
        finally:
            self.native.close()

    def _loop(self) -> None:
        events, pop, version = self.events, heapq.heappop, self.version
        # Every event is pushed at most once, and pushes are bounded by the work (see `_push_limit`).
        for _ in range(self._push_limit()):
            if not events:
                return
            time_s, _sequence, kind, index, event_version, request = pop(events)
            if kind == _MILESTONE:
                if event_version == version[index]:
                    self._on_milestone(time_s, index)
            elif kind == _ARRIVAL:
                assert request is not None
                if not self._schedule_next_arrival():  # This is the last one: close the window.
                    self.arrivals_end_s, self.completed_by_arrivals_end = time_s, self.completed
                self._route(time_s, request)
            elif kind == _TURN:
                assert request is not None
                self.arrivals_end_s, self.completed_by_arrivals_end = time_s, self.completed
                self._route(time_s, request)
            elif kind == _RETRY:
                assert request is not None
                self._route(time_s, request)
            elif kind == _DOWN:
                self._on_down(time_s, index)
            elif kind == _SPEED:
                self._on_speed(time_s, index, event_version == 1)
            else:
                self._on_up(time_s, index)
        raise RuntimeError("simulation exceeded its event bound; this is a bug")

    def _push_limit(self) -> int:
        # Per attempt: its arrival or retry event, and at most one reschedule for its start and one
        # per milestone (two per request); per failure: two events and one reschedule.
        attempts = self.scenario.requests_max * (1 + self.scenario.retries)
        changes = 3 * len(self.scenario.failures) + 4 * len(self.scenario.speed_changes)
        return 4 * attempts + changes + 16

    # ---- arrivals and routing ------------------------------------------------------------------

    def _schedule_next_arrival(self) -> bool:
        """Schedules the next arrival (a request, or a session's first turn); False when there is
        none (all have arrived)."""
        started = self.arrived if self.chat is None else self.chat.sessions
        if started >= self.scenario.requests:
            return False
        arrival = next(self.arrival_stream, None)
        if arrival is None:  # A trace shorter than the requested count.
            return False
        if self.chat is None:
            job = self.scenario.workload.draw(self.jobs_rng, arrival.prompt_tokens, arrival.output_tokens)
            request = _Request(arrival.time_s, job)
        else:
            request = self.chat.first_turn(arrival.time_s, self.jobs_rng)
        self._push_request(request, _ARRIVAL)
        if (started + 1) % _PROGRESS_EVERY == 0:
            self._compact_events()
            if self.progress is not None:
                self.progress(self.strategy, started + 1, self.scenario.requests)
        return True

    def _push_request(self, request: _Request, kind: int) -> None:
        self.arrived += 1
        heapq.heappush(self.events, (request.arrival_s, next(self.sequence), kind, 0, 0, request))

    def _route(self, now: float, request: _Request) -> None:
        conversation = request.conversation
        if conversation is None:
            index = self.native.acquire(request.job.cost)
        else:
            index = self.native.acquire_affine(request.job.cost, conversation.number, request.hashes)
        if index >= 0:
            self._start(now, index, request)
        elif request.attempts < self.scenario.retries:
            delay = self.scenario.backoff_s * (2**request.attempts)
            request.attempts += 1
            self.retries += 1
            heapq.heappush(self.events, (now + delay, next(self.sequence), _RETRY, 0, 0, request))
        else:
            self.rejected += 1
            self.end_s = max(self.end_s, now)

    def _start(self, now: float, index: int, request: _Request) -> None:
        self._advance(index, now)
        if self.chat is not None:
            self.chat.start(index, request)
        job = request.job
        request.accelerator = index
        request.started_s = now
        self.routed_s.append(now)
        self.routed_to.append(index)
        self.running[index] += 1
        self.cost_running[index] += job.cost
        self._check_bound(index, job.cost)
        clock = self.clock[index]
        heap = self.milestones[index]
        if self.streams_tokens:
            heapq.heappush(heap, (clock + job.prefill_s, next(self.sequence), False, request))
        heapq.heappush(heap, (clock + job.prefill_s + job.decode_s, next(self.sequence), True, request))
        self._reschedule(index, now)

    def _check_bound(self, index: int, cost: int) -> None:
        """Records how far this admission put the accelerator above the core's bounded load,
        ⌈(1+ε) * fleet cost in flight * its capacity x weight share⌉ (≤ 0: within it). Every
        strategy is measured; consistent_hash, prefix_affinity and least_ttft promise it."""
        self.cost_total += cost
        weights = self.native.weights
        share = self.capacities[index] * weights[index] / self._active_weighted()
        limit = math.ceil((1 + self.scenario.balance_epsilon) * self.cost_total * share)
        excess = self.cost_running[index] - limit
        if excess > self.bound_excess_max:
            self.bound_excess_max = excess

    def _active_weighted(self) -> float:
        """The active accelerators' capacity x weight (as the core's bounded load counts it)."""
        if self.native.speed is None:
            return float(self.active_capacity)
        return self._weighted_capacity

    def _weights_changed(self) -> None:
        self._weighted_capacity = sum(
            capacity * weight
            for capacity, weight, down in zip(self.capacities, self.native.weights, self.down, strict=True)
            if not down
        )

    # ---- accelerators --------------------------------------------------------------------------

    def _advance(self, index: int, now: float) -> None:
        running = self.running[index]
        if running:
            elapsed = now - self.updated_s[index]
            self.clock[index] += elapsed * self.speeds[index] / (1.0 + self.slowdown * (running - 1))
            self.busy_area[index] += elapsed * self.cost_running[index]
        self.updated_s[index] = now

    def _reschedule(self, index: int, now: float) -> None:
        """Replaces the accelerator's next-milestone event (its rate or its head changed)."""
        version = self.version[index] + 1
        self.version[index] = version
        heap = self.milestones[index]
        if heap:
            rate = self.speeds[index] / (1.0 + self.slowdown * (self.running[index] - 1))
            due_s = now + max(0.0, heap[0][0] - self.clock[index]) / rate
            heapq.heappush(self.events, (due_s, next(self.sequence), _MILESTONE, index, version, None))

    def _on_milestone(self, now: float, index: int) -> None:
        self._advance(index, now)
        heap = self.milestones[index]
        _target, _sequence, is_end, request = heapq.heappop(heap)
        self._reach(now, index, is_end, request)
        # Milestones due at the same instant are settled now rather than through zero-length events.
        due = self.clock[index] + _TIE_S
        while heap and heap[0][0] <= due:
            _target, _sequence, is_end, request = heapq.heappop(heap)
            self._reach(now, index, is_end, request)
        self._reschedule(index, now)

    def _reach(self, now: float, index: int, is_end: bool, request: _Request) -> None:
        job = request.job
        native = self.native
        if not is_end:
            request.first_token_s = now
            if native.observe(index, True, job.prefill_s, now - request.started_s, now):
                self._weights_changed()
            return
        if self.streams_tokens:
            learned = native.observe(index, False, job.decode_s, now - request.first_token_s, now)
        else:
            learned = native.observe(index, True, job.prefill_s + job.decode_s, now - request.started_s, now)
        if learned:
            self._weights_changed()
        self.running[index] -= 1
        self.cost_running[index] -= job.cost
        self.cost_total -= job.cost
        latency_s = now - request.arrival_s
        self.native.release(index, job, latency_s, True)
        self.completed += 1
        self.output_tokens += job.output_tokens
        self.latencies.append(latency_s)
        if self.streams_tokens:
            self.ttfts.append(request.first_token_s - request.arrival_s)
        self.end_s = max(self.end_s, now)
        if self.chat is not None:
            self.chat.end(index, request)
            following = self.chat.next_turn(now, request)
            if following is not None:
                self._push_request(following, _TURN)

    # ---- failures ------------------------------------------------------------------------------

    def _schedule_failures(self) -> None:
        for number, change in enumerate(self.scenario.speed_changes):
            heapq.heappush(self.events, (change.from_s, next(self.sequence), _SPEED, number, 0, None))
            if change.until_s is not None:
                heapq.heappush(self.events, (change.until_s, next(self.sequence), _SPEED, number, 1, None))
        for number, failure in enumerate(self.scenario.failures):
            heapq.heappush(self.events, (failure.down_s, next(self.sequence), _DOWN, number, 0, None))
            if failure.up_s is not None:
                heapq.heappush(self.events, (failure.up_s, next(self.sequence), _UP, number, 0, None))

    def _on_speed(self, now: float, number: int, ended: bool) -> None:
        """A speed change starts (the accelerator slows by its factor) or ends (it recovers):
        the progress clock is brought up to date at the old speed first."""
        change = self.scenario.speed_changes[number]
        index = change.accelerator
        self._advance(index, now)
        factor = change.factor
        self.speeds[index] = self.speeds[index] * factor if ended else self.speeds[index] / factor
        self._reschedule(index, now)

    def _on_down(self, now: float, number: int) -> None:
        index = self.scenario.failures[number].accelerator
        self.routed_at_down[number] = self.native.routed(index)
        self.native.set_down(index, True)
        self.active_capacity -= self.capacities[index]
        self.down[index] = True
        self._weights_changed()
        if self.scenario.on_failure == "fail":
            self._fail_in_flight(now, index)
            if self.chat is not None:
                self.chat.caches[index].clear()

    def _fail_in_flight(self, now: float, index: int) -> None:
        self._advance(index, now)
        for _target, _sequence, is_end, request in self.milestones[index]:
            if is_end:
                self.native.release(index, request.job, now - request.arrival_s, False)
                self.failed += 1
                self.cost_total -= request.job.cost
        self.milestones[index].clear()
        self.running[index] = self.cost_running[index] = 0
        self._reschedule(index, now)

    def _on_up(self, now: float, number: int) -> None:
        self._record_outage(number)
        accelerator = self.scenario.failures[number].accelerator
        self.native.set_down(accelerator, False)
        self.active_capacity += self.capacities[accelerator]
        self.down[accelerator] = False
        self._weights_changed()

    def _record_outage(self, number: int) -> None:
        failure = self.scenario.failures[number]
        routed = self.native.routed(failure.accelerator) - self.routed_at_down.pop(number)
        self.outages.append(Outage(failure.accelerator, failure.down_s, failure.up_s, routed))

    # ---- the end -------------------------------------------------------------------------------

    def _compact_events(self) -> None:
        """Drops stale milestone events so the heap stays proportional to the live work."""
        live = len(self.milestones) + sum(self.running)
        if len(self.events) <= _STALE_FACTOR * live + 1024:
            return
        version = self.version
        self.events = [e for e in self.events if e[2] != _MILESTONE or e[4] == version[e[3]]]
        heapq.heapify(self.events)

    def _finish(self) -> None:
        for number in sorted(self.routed_at_down):  # Windows that never closed.
            self._record_outage(number)
        for index in range(len(self.clock)):
            self._advance(index, max(self.end_s, self.updated_s[index]))
        self.native.check_idle()

    def _result(self) -> StrategyResult:
        duration_s = self.end_s
        capacities = self.scenario.fleet.capacities
        utilisation = tuple(
            area / (capacity * duration_s) if duration_s > 0 else 0.0
            for area, capacity in zip(self.busy_area, capacities, strict=True)
        )
        latencies = array("d", sorted(self.latencies))
        ttfts = array("d", sorted(self.ttfts))
        return StrategyResult(
            strategy=self.strategy,
            requests=self.arrived,
            completed=self.completed,
            rejected=self.rejected,
            failed=self.failed,
            retries=self.retries,
            duration_s=duration_s,
            arrivals_end_s=self.arrivals_end_s,
            completed_by_arrivals_end=self.completed_by_arrivals_end,
            output_tokens=self.output_tokens,
            latency=Percentiles.of(latencies),
            ttft=Percentiles.of(ttfts) if self.streams_tokens else None,
            utilisation=utilisation,
            outages=tuple(sorted(self.outages, key=lambda outage: (outage.down_s, outage.accelerator))),
            latencies_s=latencies,
            ttfts_s=ttfts,
            capacities=capacities,
            balance_epsilon=self.scenario.balance_epsilon,
            bound_excess_max=max(0, int(self.bound_excess_max)) if self.completed else 0,
            prompt_blocks=0 if self.chat is None else self.chat.prompt_blocks,
            cached_blocks=0 if self.chat is None else self.chat.cached_blocks,
            affinity=Affinity.of(self.native.outcomes),
            routed_s=self.routed_s,
            routed_to=self.routed_to,
        )
