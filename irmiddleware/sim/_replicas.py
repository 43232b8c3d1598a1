"""Router replicas behind an L4 balancer: R routers, each with its own books, one shared fleet.

Every replica is a real `Router` (the native core) with the whole fleet at full capacity, as each
`irmiddleware serve` replica is configured; none knows what the others sent. Each turn of a chat
session goes to a replica drawn at random (a balancer spreads connections, not sessions), with
replica 0 drawn `skew` times as often as each other one: clients hit one replica harder.

The accelerators are queues, as inference servers are: `capacity` requests run at once, each at
the rate of a full batch (`Fleet.service_rate(i, capacity)`), the rest wait in FIFO order. A turn
reuses the prefix its accelerator caches (`PrefixCache`, as in the single-router chat
simulation), so where a session's turns land decides its prefill. Time to first token is waiting
plus prefill.

Signals: every `signal_interval_s` each accelerator's running + waiting count is read, and reaches
every replica `signal_delay_s` later (a scrape's round trip); a replica hands `queue_aware` what
the accelerator reported minus its own requests there at that moment, as the proxy's signal
scraper does. The other strategies see only their own books.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import random
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from irmiddleware import Accelerator, Router
from irmiddleware._prefix_cache import PrefixCache
from irmiddleware.sim._chat import ChatWorkload, Conversation, chat_requests_max
from irmiddleware.sim._engine import Scenario
from irmiddleware.sim._model import Arrival
from irmiddleware.sim._stats import Percentiles

__all__ = [
    "REPLICA_STRATEGIES",
    "ReplicaResult",
    "ReplicaScenario",
    "format_replica_table",
    "replica_study",
    "simulate_replicas",
]

REPLICA_STRATEGIES: Final = ("p2c", "queue_aware", "consistent_hash", "prefix_affinity")

# Event kinds; equal times are ordered by sequence number.
_SESSION, _TURN, _END, _SCRAPE, _DELIVER = range(5)
# Signals never age out inside the core: the simulation delays them itself, in simulated time.
_SIGNAL_AGE_MAX_S: Final = 1e6  # 11 days: within the core's u32 of milliseconds


@dataclass(frozen=True)
class ReplicaScenario:
    """A chat `scenario` (fleet, sessions, arrivals of session starts, seed) routed by `replicas`
    routers; replica 0 gets `skew` times the traffic of each other replica."""

    scenario: Scenario
    replicas: int
    skew: float = 3.0
    signal_interval_s: float = 1.0
    signal_delay_s: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.scenario.workload, ChatWorkload):
            raise ValueError("the replica study needs the chat workload (sessions and prefix caches)")
        if not 1 <= self.replicas <= 64:
            raise ValueError("replicas must be in 1..64")
        if self.skew < 1:
            raise ValueError("skew must be >= 1 (replica 0 gets the most traffic)")
        if self.signal_interval_s <= 0 or self.signal_delay_s < 0:
            raise ValueError("the signal interval must be > 0 and the delay >= 0")

    @property
    def weights(self) -> list[float]:
        return [self.skew] + [1.0] * (self.replicas - 1)


@dataclass(frozen=True, slots=True)
class ReplicaResult:
    """One strategy with one replica count."""

    strategy: str
    replicas: int
    requests: int
    completed: int
    rejected: int
    imbalance: float
    """max/mean over the accelerators of their time-averaged requests in progress per batch slot
    (1.0 is even; a faster accelerator has more slots)."""
    ttft: Percentiles | None
    cache_hit_rate: float
    """Prompt blocks served from an accelerator's prefix cache, over all prompt blocks."""
    affinity_hit_rate: float | None
    """Decisions that went to the key's or prefix's owner; None for strategies without affinity."""


class _Turn:
    __slots__ = ("accelerator", "arrival_s", "conversation", "hashes", "replica", "ticket")

    def __init__(self, arrival_s: float, conversation: Conversation) -> None:
        self.arrival_s = arrival_s
        self.conversation = conversation
        self.hashes: list[int] = []
        self.replica = self.accelerator = self.ticket = -1


class _Accelerators:
    """The fleet as queues: who runs, who waits, the area under in-progress for the imbalance,
    and each one's prefix cache."""

    def __init__(self, study: ReplicaScenario) -> None:
        fleet, workload = study.scenario.fleet, study.scenario.workload
        assert isinstance(workload, ChatWorkload)
        self.slots = fleet.capacities
        self.rates = [fleet.service_rate(i, cap) for i, cap in enumerate(fleet.capacities)]
        self.running = [0] * len(fleet)
        self.waiting: list[collections.deque[_Turn]] = [collections.deque() for _ in range(len(fleet))]
        self.caches = [PrefixCache(workload.cache_blocks(cap)) for cap in fleet.capacities]
        self.area = [0.0] * len(fleet)
        self.updated_s = [0.0] * len(fleet)

    def in_progress(self, index: int) -> int:
        return self.running[index] + len(self.waiting[index])

    def account(self, index: int, now: float) -> None:
        self.area[index] += (now - self.updated_s[index]) * self.in_progress(index)
        self.updated_s[index] = now

    def imbalance(self, end_s: float) -> float:
        """max/mean over the accelerators of requests in progress per batch slot, time-averaged."""
        for index in range(len(self.area)):
            self.account(index, end_s)
        per_slot = [area / slots for area, slots in zip(self.area, self.slots, strict=True)]
        mean = sum(per_slot) / len(per_slot)
        return max(per_slot) / mean if mean > 0 else math.nan


class _ReplicaSimulation:
    def __init__(self, study: ReplicaScenario, strategy: str) -> None:
        scenario = study.scenario
        assert isinstance(scenario.workload, ChatWorkload)
        self.study, self.strategy, self.workload = study, strategy, scenario.workload
        fleet = scenario.fleet
        self.routers = [self._router(scenario, strategy, replica) for replica in range(study.replicas)]
        self.ids_by_ticket: list[dict[int, int]] = [{} for _ in self.routers]
        self.ours = [[0] * len(fleet) for _ in self.routers]
        self.fleet = _Accelerators(study)
        self.events: list[tuple[float, int, int, object]] = []
        self.sequence = itertools.count()
        self.rng = random.Random(f"{scenario.seed}/replicas")
        self.jobs_rng = random.Random(f"{scenario.seed}/jobs")
        self.arrivals: Iterator[Arrival] = scenario.arrivals.arrivals(
            random.Random(f"{scenario.seed}/arrivals")
        )
        self.sessions = self.requests = self.completed = self.rejected = 0
        self.pending = 0  # session starts, turns and requests not yet finished: the run's end
        self.prompt_blocks = self.cached_blocks = 0
        self.outcomes: dict[str | None, int] = {}
        self.ttfts = array("d")
        self.end_s = 0.0

    @staticmethod
    def _router(scenario: Scenario, strategy: str, replica: int) -> Router:
        router = Router(
            strategy,
            max_accelerators=len(scenario.fleet),
            seed=scenario.seed * 1_000 + replica,  # replicas draw their own random choices
            balance_epsilon=scenario.balance_epsilon,
            prefix_index_entries=scenario.prefix_index_entries,
            signal_age_max_s=_SIGNAL_AGE_MAX_S,
        )
        for index, capacity in enumerate(scenario.fleet.capacities):
            router.add_accelerator(Accelerator(index, capacity))
        return router

    def push(self, time_s: float, kind: int, payload: object = None) -> None:
        if kind not in (_SCRAPE, _DELIVER):
            self.pending += 1
        heapq.heappush(self.events, (time_s, next(self.sequence), kind, payload))

    def run(self) -> ReplicaResult:
        try:
            self._next_session()
            self.push(self.study.signal_interval_s, _SCRAPE)
            self._loop()
            for router in self.routers:
                if any(s.load or s.requests_in_flight for s in router.stats()):
                    raise RuntimeError("a replica ended with load still in flight")
            return self._result()
        finally:
            for router in self.routers:
                router.close()

    def _loop(self) -> None:
        scrapes = math.ceil(1e7 / self.study.signal_interval_s)
        bound = 4 * chat_requests_max(self.workload, self.study.scenario.requests) + 2 * scrapes + 16
        for _ in range(bound):
            if not self.events:
                return
            now, _sequence, kind, payload = heapq.heappop(self.events)
            if kind not in (_SCRAPE, _DELIVER):
                self.pending -= 1
            if kind == _SESSION:
                self._on_session(now)
            elif kind == _TURN:
                assert isinstance(payload, _Turn)
                self._on_turn(now, payload)
            elif kind == _END:
                assert isinstance(payload, _Turn)
                self._on_end(now, payload)
            elif kind == _SCRAPE:
                self._on_scrape(now)
            else:
                assert isinstance(payload, list)
                self._deliver(payload)
        raise RuntimeError("replica simulation exceeded its event bound; this is a bug")

    # ---- sessions and turns ----------------------------------------------------------------------

    def _next_session(self) -> None:
        if self.sessions >= self.study.scenario.requests:
            return
        arrival = next(self.arrivals, None)
        if arrival is not None:
            self.push(arrival.time_s, _SESSION)

    def _on_session(self, now: float) -> None:
        conversation = Conversation(self.sessions, self.workload.session(self.jobs_rng), self.workload)
        self.sessions += 1
        self._next_session()
        self._on_turn(now, _Turn(now, conversation))

    def _on_turn(self, now: float, turn: _Turn) -> None:
        self.requests += 1
        plan = turn.conversation.plan.turns[turn.conversation.turn]
        turn.hashes = turn.conversation.blocks(plan.prompt_tokens, self.workload.block_tokens)
        turn.replica = self.rng.choices(range(self.study.replicas), self.study.weights)[0]
        router = self.routers[turn.replica]
        ticket, affinity, _matched = router.acquire_slot_affine(
            self.workload.cost, affinity_key=turn.conversation.number, prefix_hashes=turn.hashes or None
        )
        self.outcomes[affinity] = self.outcomes.get(affinity, 0) + 1
        if ticket is None:
            self.rejected += 1  # the user gives up: the session ends here
            return
        ids = self.ids_by_ticket[turn.replica]
        index = ids.get(ticket)
        if index is None:
            index = ids[ticket] = router.id_of_slot(ticket)
        turn.ticket, turn.accelerator = ticket, index
        self.ours[turn.replica][index] += 1
        self.fleet.account(index, now)
        if self.fleet.running[index] < self.fleet.slots[index]:
            self._start(now, index, turn)
        else:
            self.fleet.waiting[index].append(turn)

    def _start(self, now: float, index: int, turn: _Turn) -> None:
        self.fleet.running[index] += 1
        cache = self.fleet.caches[index]
        cached = cache.cached_prefix(turn.hashes)
        self.prompt_blocks += len(turn.hashes)
        self.cached_blocks += cached
        cache.store(turn.hashes)
        plan = turn.conversation.plan.turns[turn.conversation.turn]
        job = self.workload.job(plan.prompt_tokens, plan.output_tokens, cached * self.workload.block_tokens)
        rate = self.fleet.rates[index]
        self.ttfts.append(now + job.prefill_s / rate - turn.arrival_s)
        self.push(now + (job.prefill_s + job.decode_s) / rate, _END, turn)

    def _on_end(self, now: float, turn: _Turn) -> None:
        index = turn.accelerator
        self.fleet.account(index, now)
        self.fleet.running[index] -= 1
        latency_us = int((now - turn.arrival_s) * 1e6)
        self.routers[turn.replica].release_slot(turn.ticket, self.workload.cost, latency_us, True)
        self.ours[turn.replica][index] -= 1
        self.completed += 1
        self.end_s = max(self.end_s, now)
        conversation = turn.conversation
        plan = conversation.plan.turns[conversation.turn]
        tokens = plan.prompt_tokens + plan.output_tokens
        self.fleet.caches[index].store(conversation.blocks(tokens, self.workload.block_tokens))
        if self.fleet.waiting[index]:
            self._start(now, index, self.fleet.waiting[index].popleft())
        conversation.turn += 1
        if conversation.turn < len(conversation.plan.turns):
            self.push(now + plan.think_s, _TURN, _Turn(now + plan.think_s, conversation))

    # ---- signals -------------------------------------------------------------------------------

    def _on_scrape(self, now: float) -> None:
        if self.pending == 0:
            return  # the run is over: no more scrapes
        reported = [self.fleet.in_progress(index) for index in range(len(self.fleet.slots))]
        self.push(now + self.study.signal_delay_s, _DELIVER, reported)
        self.push(now + self.study.signal_interval_s, _SCRAPE)

    def _deliver(self, reported: list[int]) -> None:
        if self.strategy != "queue_aware":
            return  # the others never read signals: skipping them changes nothing
        read_at = time.monotonic()
        for router, ours in zip(self.routers, self.ours, strict=True):
            for index, count in enumerate(reported):
                router.set_signals(index, queue_depth=max(0, count - ours[index]), read_at=read_at)

    def _result(self) -> ReplicaResult:
        decisions = sum(count for outcome, count in self.outcomes.items() if outcome is not None)
        return ReplicaResult(
            strategy=self.strategy,
            replicas=self.study.replicas,
            requests=self.requests,
            completed=self.completed,
            rejected=self.rejected,
            imbalance=self.fleet.imbalance(self.end_s),
            ttft=Percentiles.of(sorted(self.ttfts)),
            cache_hit_rate=self.cached_blocks / self.prompt_blocks if self.prompt_blocks else 0.0,
            affinity_hit_rate=self.outcomes.get("hit", 0) / decisions if decisions else None,
        )


def simulate_replicas(study: ReplicaScenario, strategy: str) -> ReplicaResult:
    """Runs `study` with `strategy` on every replica and measures it."""
    return _ReplicaSimulation(study, strategy).run()


def replica_study(
    scenario: Scenario,
    replica_counts: Iterable[int],
    strategies: Sequence[str] = REPLICA_STRATEGIES,
    **options: float,
) -> list[ReplicaResult]:
    """Every strategy at every replica count, on the same sessions (`options`: `skew`,
    `signal_interval_s`, `signal_delay_s` of `ReplicaScenario`)."""
    return [
        simulate_replicas(ReplicaScenario(scenario, count, **options), strategy)
        for count in replica_counts
        for strategy in strategies
    ]


def format_replica_table(results: Sequence[ReplicaResult]) -> str:
    """One row per (replicas, strategy): imbalance, TTFT p50/p99, cache and affinity hit rates."""
    header = (
        "replicas",
        "strategy",
        "imbalance",
        "TTFT p50 s",
        "TTFT p99 s",
        "cache hits",
        "affinity hits",
        "rejected",
    )
    rows = [
        (
            str(r.replicas),
            r.strategy,
            f"{r.imbalance:.2f}",
            f"{r.ttft.p50:.3f}" if r.ttft else "n/a",
            f"{r.ttft.p99:.3f}" if r.ttft else "n/a",
            f"{r.cache_hit_rate:.1%}",
            "-" if r.affinity_hit_rate is None else f"{r.affinity_hit_rate:.1%}",
            str(r.rejected),
        )
        for r in results
    ]
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]
    lines = []
    for row in (header, *rows):
        cells = [
            cell.ljust(w) if column < 2 else cell.rjust(w)
            for column, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
