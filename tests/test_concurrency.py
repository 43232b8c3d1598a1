"""Concurrency, proven by a checker rather than by timings: threads (every native call releases
the GIL) and, separately, processes sharing one table in /dev/shm hammer acquire/release with
random costs. The checker keeps its own account of what each backend holds and proves that
capacity was never exceeded at any observed instant; at the end every in-flight counter is zero
and the totals add up. A deliberately racy table (plain load/store instead of CAS) must make the
same checker fail, which proves the test can catch a race."""

from __future__ import annotations

import multiprocessing
import random
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from irmiddleware import _native
from irmiddleware._errors import NativeError
from irmiddleware._native import SLOT_NONE, NativeTable, slot_of_ticket

pytestmark = pytest.mark.slow  # races threads and forked processes on one table

CAPACITIES = [7, 10, 13, 16]
ITERATIONS = 20_000
THREADS = 4
PROCESSES = 3
STRATEGY_NUMBERS = [int(strategy) for strategy in _native.StrategyCode]


@dataclass
class Checker:
    """The test's own account of each slot's holdings, kept under one lock."""

    capacities: dict[int, int]
    held: dict[int, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    acquired: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_acquired(self, slot: int, cost: int) -> None:
        with self.lock:
            self.acquired += 1
            self.held[slot] = self.held.get(slot, 0) + cost
            # Holdings are added after the core reserved them and removed before the core gets
            # them back, so they never exceed what the core has reserved: if the core is right,
            # they never exceed capacity either.
            if self.held[slot] > self.capacities[slot]:
                self.violations.append(f"slot {slot} holds {self.held[slot]} > {self.capacities[slot]}")

    def on_releasing(self, slot: int, cost: int) -> None:
        with self.lock:
            self.held[slot] -= cost


def hammer(table: NativeTable, seed: int, iterations: int, checker: Checker) -> None:
    """Random acquires and releases, holding up to 8 reservations at a time."""
    rng = random.Random(seed)
    holding: list[tuple[int, int]] = []
    try:
        for _ in range(iterations):
            if holding and (len(holding) >= 8 or rng.random() < 0.5):
                ticket, cost = holding.pop(rng.randrange(len(holding)))
                checker.on_releasing(slot_of_ticket(ticket), cost)
                table.release(ticket, cost, rng.randrange(1000), rng.random() < 0.9)
                continue
            cost = rng.randint(1, 5)
            ticket = table.acquire(rng.choice(STRATEGY_NUMBERS), cost, rng.randrange(3))
            if ticket != SLOT_NONE:
                checker.on_acquired(slot_of_ticket(ticket), cost)
                holding.append((ticket, cost))
        for ticket, cost in holding:
            checker.on_releasing(slot_of_ticket(ticket), cost)
            table.release(ticket, cost, 0, True)
    except NativeError as error:  # A corrupted account shows up as a refused release.
        checker.violations.append(f"native error: {error}")


def make_table(flags: int = 0, shared_name: str | None = None) -> tuple[NativeTable, dict[int, int]]:
    table = NativeTable(16, flags=flags, shared_name=shared_name)
    capacities = {table.add(index, capacity): capacity for index, capacity in enumerate(CAPACITIES)}
    return table, capacities


def final_problems(table: NativeTable, acquired: int) -> list[str]:
    """What is wrong with the table once all traffic has ended."""
    problems = []
    routed = 0
    for info in table.snapshot():
        routed += info.routed_total
        if info.cost_in_flight or info.count_in_flight:
            problems.append(
                f"slot {info.slot}: {info.cost_in_flight} cost / {info.count_in_flight} still in flight"
            )
        if info.routed_total != info.completed_total + info.failed_total:
            problems.append(f"slot {info.slot}: routed {info.routed_total} != completed + failed")
    if routed != acquired:
        problems.append(f"core counted {routed} routed, clients acquired {acquired}")
    return problems


def run_threads(flags: int) -> list[str]:
    table, capacities = make_table(flags)
    with table:
        checker = Checker(capacities)
        threads = [
            threading.Thread(target=hammer, args=(table, seed, ITERATIONS, checker))
            for seed in range(THREADS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads)
        return checker.violations + final_problems(table, checker.acquired)


def test_threads_never_exceed_capacity_and_end_at_zero() -> None:
    assert run_threads(flags=0) == []


def test_the_checker_catches_a_racy_table() -> None:
    assert run_threads(flags=_native.FLAG_RACY_FOR_TESTS) != []


# ---- processes -------------------------------------------------------------------------------


class SharedChecker(Checker):
    """The same account in shared memory, for worker processes."""

    def __init__(self, capacities: dict[int, int], context: Any) -> None:
        super().__init__(capacities)
        self.shared_held = context.Array("q", 16, lock=False)
        self.shared_acquired = context.Value("q", 0, lock=False)
        self.shared_violations = context.Value("q", 0, lock=False)
        self.shared_lock = context.Lock()

    def on_acquired(self, slot: int, cost: int) -> None:
        with self.shared_lock:
            self.shared_acquired.value += 1
            self.shared_held[slot] += cost
            if self.shared_held[slot] > self.capacities[slot]:
                self.shared_violations.value += 1

    def on_releasing(self, slot: int, cost: int) -> None:
        with self.shared_lock:
            self.shared_held[slot] -= cost


def process_worker(name: str, seed: int, checker: SharedChecker) -> None:
    table = NativeTable(0, shared_name=name, attach=True)
    hammer(table, seed, ITERATIONS, checker)
    if checker.violations:
        with checker.shared_lock:
            checker.shared_violations.value += len(checker.violations)
    table.close()


def run_processes(shared_name: str, flags: int) -> list[str]:
    context = multiprocessing.get_context("fork")
    table, capacities = make_table(flags, shared_name=shared_name)
    with table:
        checker = SharedChecker(capacities, context)
        workers = [
            context.Process(target=process_worker, args=(shared_name, seed, checker))
            for seed in range(PROCESSES)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        assert [worker.exitcode for worker in workers] == [0] * PROCESSES
        violations = checker.shared_violations.value
        problems = [f"{violations} violations"] if violations else []
        return problems + final_problems(table, checker.shared_acquired.value)


def test_processes_sharing_a_table_never_exceed_capacity(shared_name: str) -> None:
    assert run_processes(shared_name, flags=0) == []


def test_the_checker_catches_a_racy_shared_table(shared_name: str) -> None:
    assert run_processes(shared_name, flags=_native.FLAG_RACY_FOR_TESTS) != []


def test_attached_processes_see_one_set_of_counters(shared_name: str) -> None:
    owner, _capacities = make_table(shared_name=shared_name)
    with owner, NativeTable(0, shared_name=shared_name, attach=True) as other:
        ticket = other.acquire(int(_native.StrategyCode.ROUND_ROBIN), 3, 0)
        assert owner.read(slot_of_ticket(ticket)).cost_in_flight == 3
        owner.release(ticket, 3, 10, True)
        assert other.read(slot_of_ticket(ticket)).cost_in_flight == 0
        assert other.backends_max == owner.backends_max == 16


@pytest.mark.parametrize("bad_name", ["", "a/b", "../x", ".hidden", "x" * 201])
def test_bad_shared_names_are_refused(bad_name: str) -> None:
    with pytest.raises(_native._errors.InvalidArgumentError):
        NativeTable(4, shared_name=bad_name)


def test_shared_table_errors_are_typed(shared_name: str) -> None:
    with pytest.raises(_native._errors.SharedMemoryError) as missing:
        NativeTable(0, shared_name=shared_name, attach=True)
    assert missing.value.status == "shared_not_found"
    table = NativeTable(4, shared_name=shared_name)
    with pytest.raises(_native._errors.SharedMemoryError) as exists:
        NativeTable(4, shared_name=shared_name)
    assert exists.value.status == "shared_exists"
    table.close()


# ---- closing while threads route ---------------------------------------------------------------

CLOSE_WHILE_ROUTING = """
import sys, threading, time
from irmiddleware import Accelerator, InvalidHandleError, Router

def route(router, refused):
    try:
        while True:
            ticket = router.acquire_slot(1)
            if ticket is not None:
                router.release_slot(ticket, 1)
    except InvalidHandleError:
        refused.append(1)

for round in range(int(sys.argv[1])):
    router = Router("round_robin", max_accelerators=4)
    for index in range(2):
        router.add_accelerator(Accelerator(index, capacity=8))
    refused = []
    threads = [threading.Thread(target=route, args=(router, refused)) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.001 * (round % 5))
    router.close()
    for thread in threads:
        thread.join()
    assert len(refused) == 3, refused
print("survived")
"""


def test_closing_a_router_while_threads_route_is_safe() -> None:
    # Each round closes the router under three routing threads; every thread must end with a
    # clean InvalidHandleError. A use of the unmapped table would kill the child with a signal.
    result = subprocess.run(
        [sys.executable, "-c", CLOSE_WHILE_ROUTING, "150"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip() == "survived"
