"""`irmiddleware bench`: the seed's scale test (10,000 accelerators, 100,000 requests) for each
strategy, measured per call and batched, route-only and route+release, with the seed package
(`intelligent_routing`) measured in the same run when it is importable. Prints numbers; asserts
nothing (benchmarks are not tests).

Per-call pairs are measured four ways, from the most convenient to the floor: the seed API
(`route_request` then `complete`), a `Lease`, the router's public slot calls
(`Router.acquire_slot`/`release_slot`), and the binding's table (`_native.NativeTable`, what the
slot calls wrap). The batched modes call the binding's batch
functions on a table of their own: 10,000 decisions per foreign call.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from irmiddleware import STRATEGIES, Accelerator, Request, Router, _native
from irmiddleware.bench._harness import format_table

CAPACITY = 100
BATCH = 10_000


@dataclass(frozen=True)
class Result:
    strategy: str
    mode: str
    rate: float  # decisions (or route+release pairs) per second


def median_rates(runs: dict[str, Callable[[], float]], operations: int, repeats: int) -> dict[str, float]:
    """Each run returns its timed seconds (setup excluded). Each repeat runs every mode once, in
    turn, so a noisy neighbour on a shared machine slows the modes (and the seed package's
    baseline) of one repeat alike; the median rate of `repeats` runs is robust to it."""
    rates: dict[str, list[float]] = {mode: [] for mode in runs}
    for _ in range(repeats):
        for mode, run in runs.items():
            rates[mode].append(operations / run())
    return {mode: statistics.median(values) for mode, values in rates.items()}


def fresh_router(strategy: str, accelerators: int) -> Router:
    router = Router(strategy, max_accelerators=accelerators, seed=1)
    for index in range(accelerators):
        router.add_accelerator(Accelerator(index, CAPACITY))
    return router


def fresh_table(accelerators: int) -> _native.NativeTable:
    """The binding's table alone, filled like `fresh_router`'s."""
    table = _native.NativeTable(accelerators)
    table.seed(1)
    for index in range(accelerators):
        table.add(index, CAPACITY)
    return table


def route_per_call(route: Callable[[Any], object], request_type: Any, requests: int) -> float:
    """The seed's measure: `route_request(Request(...))` in a loop, nothing released."""
    started = time.perf_counter()
    for index in range(requests):
        route(request_type(index, 1, 1))
    return time.perf_counter() - started


def ours_route_per_call(strategy: str, accelerators: int, requests: int) -> Callable[[], float]:
    def run() -> float:
        with fresh_router(strategy, accelerators) as router:
            return route_per_call(router.route_request, Request, requests)

    return run


def seed_route_per_call(
    seed: ModuleType, strategy: str, accelerators: int, requests: int
) -> Callable[[], float]:
    def run() -> float:
        router = seed.Router(strategy)
        for index in range(accelerators):
            router.add_accelerator(seed.Accelerator(index, CAPACITY))
        return route_per_call(router.route_request, seed.Request, requests)

    return run


def seed_api_pairs_per_call(router: Router, requests: int) -> Callable[[], float]:
    """`route_request(Request(...))` then `complete(id)`, one request at a time."""

    def run() -> float:
        route, complete = router.route_request, router.complete
        started = time.perf_counter()
        for index in range(requests):
            if route(Request(index, 1, 0)) is not None:
                complete(index)
        return time.perf_counter() - started

    return run


def pairs_per_call(router: Router, requests: int) -> Callable[[], float]:
    """Route then release, one request at a time, through the public lease API."""

    def run() -> float:
        acquire = router.acquire
        started = time.perf_counter()
        for _ in range(requests):
            lease = acquire(1, 0)
            if lease is not None:
                lease.release(True, 0.0)
        return time.perf_counter() - started

    return run


def pairs_per_call_slots(router: Router, requests: int) -> Callable[[], float]:
    """Route then release through the router's public slot calls (no `Lease`)."""

    def run() -> float:
        acquire, release = router.acquire_slot, router.release_slot
        started = time.perf_counter()
        for _ in range(requests):
            ticket = acquire(1, 0)
            if ticket is not None:
                release(ticket, 1, 0, True)
        return time.perf_counter() - started

    return run


def pairs_per_call_binding(table: _native.NativeTable, number: int, requests: int) -> Callable[[], float]:
    """Route then release through the binding's hot path: the floor of a per-call pair."""

    def run() -> float:
        acquire, release, none = table.acquire, table.release, _native.SLOT_NONE
        started = time.perf_counter()
        for _ in range(requests):
            ticket = acquire(number, 1, 0)
            if ticket != none:
                release(ticket, 1, 0, True)
        return time.perf_counter() - started

    return run


def batched(
    table: _native.NativeTable, number: int, requests: int, timed_release: bool
) -> Callable[[], float]:
    """`BATCH` decisions per foreign call; the releases are timed only for route+release."""
    costs = _native.int32_array([1] * BATCH)
    batches = [_native.ticket_array(BATCH) for _ in range(requests // BATCH)]

    def run() -> float:
        elapsed = 0.0
        for tickets in batches:
            started = time.perf_counter()
            table.acquire_batch(number, 0, costs, tickets)
            if timed_release:
                table.release_batch(tickets, costs, None, True)
            elapsed += time.perf_counter() - started
        if not timed_release:  # Return the load so every repeat starts from an idle fleet.
            for tickets in batches:
                table.release_batch(tickets, costs, None, True)
        return elapsed

    return run


def seed_module() -> ModuleType | None:
    try:
        return importlib.import_module("intelligent_routing")
    except ImportError:
        return None


SEED_MODE = "seed intelligent_routing per call"


def measure(
    strategy: str, accelerators: int, requests: int, repeats: int, seed: ModuleType | None
) -> tuple[list[Result], float | None]:
    """Our modes and, when `seed` is given, the seed package's per-call rate measured in the same
    repeats (beside our per-call rows, which it is the baseline of)."""
    number = int(STRATEGIES[strategy])
    table = fresh_table(accelerators)
    with fresh_router(strategy, accelerators) as router:
        runs = {
            "route per call (seed API)": ours_route_per_call(strategy, accelerators, requests),
            "route batched": batched(table, number, requests, timed_release=False),
            "route+complete per call (seed API)": seed_api_pairs_per_call(router, requests),
            "route+release per call (Lease)": pairs_per_call(router, requests),
            "route+release per call (slots)": pairs_per_call_slots(router, requests),
            "route+release per call (binding)": pairs_per_call_binding(table, number, requests),
            "route+release batched": batched(table, number, requests, timed_release=True),
        }
        if seed is not None:
            runs[SEED_MODE] = seed_route_per_call(seed, strategy, accelerators, requests)
        try:
            rates = median_rates(runs, requests, repeats)
        finally:
            table.close()
    seed_rate = rates.pop(SEED_MODE, None)
    return [Result(strategy, mode, rate) for mode, rate in rates.items()], seed_rate


def print_table(results: list[Result], seed_rates: dict[str, float]) -> None:
    rows = []
    for result in results:
        baseline = seed_rates.get(result.strategy)
        ratio = f"{result.rate / baseline:.1f}x" if baseline else "-"
        rows.append([result.strategy, result.mode, f"{result.rate:,.0f}", ratio])
    for strategy, rate in seed_rates.items():
        rows.append([strategy, SEED_MODE, f"{rate:,.0f}", "1.0x"])
    print(format_table(["strategy", "mode", "per second", "x seed per call"], rows, left=2))


def bench_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="irmiddleware bench", description=__doc__)
    parser.add_argument("--accelerators", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    parser.add_argument("--strategy", action="append", choices=sorted(STRATEGIES), help="default: all")
    args = parser.parse_args(argv)
    if args.requests < BATCH or args.requests % BATCH:
        parser.error(f"--requests must be a positive multiple of {BATCH}")
    strategies = args.strategy or ["round_robin", "least_connections", "p2c"]
    seed = seed_module()
    print(f"{args.accelerators:,} accelerators (capacity {CAPACITY}), {args.requests:,} requests, cost 1, "
          f"median of {args.repeats}")  # fmt: skip
    if seed is None:
        print(
            "seed package intelligent_routing not importable: no baseline (pip install intelligent-routing)"
        )
    seed_rates: dict[str, float] = {}
    results: list[Result] = []
    for strategy in strategies:
        rows, seed_rate = measure(strategy, args.accelerators, args.requests, args.repeats, seed)
        results += rows
        if seed_rate is not None:
            seed_rates[strategy] = seed_rate
    print_table(results, seed_rates)
    return 0
