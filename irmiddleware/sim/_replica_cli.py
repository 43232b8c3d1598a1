"""`irmiddleware simulate --replicas 1,2,4,8`: the replica study's options and its report."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from irmiddleware.sim._engine import Scenario
from irmiddleware.sim._replicas import REPLICA_STRATEGIES, format_replica_table, replica_study

__all__ = ["add_replica_options", "run_replica_study"]


def add_replica_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--replicas (router replicas with their own books; chat workload)")
    group.add_argument(
        "--replicas",
        metavar="R,R,...",
        help="replica counts to compare, e.g. 1,2,4,8 (implies --workload chat)",
    )
    group.add_argument(
        "--client-skew", type=float, default=3.0, help="replica 0's traffic over each other's (default 3)"
    )
    group.add_argument("--signal-interval", type=float, default=1.0, help="engine scrape interval, s (1.0)")
    group.add_argument("--signal-delay", type=float, default=0.1, help="scrape to core delay, s (0.1)")


def run_replica_study(args: argparse.Namespace, scenario_of: Callable[[argparse.Namespace], Scenario]) -> int:
    """Prints one row per (replica count, strategy); 2 on a bad option."""
    try:
        counts = [int(count) for count in args.replicas.split(",")]
    except ValueError:
        print(
            f"irmiddleware simulate: --replicas expects counts like 1,2,4,8, got {args.replicas!r}",
            file=sys.stderr,
        )
        return 2
    try:
        scenario = scenario_of(args)
        strategies = args.strategies.split(",") if args.strategies else REPLICA_STRATEGIES
        started = time.perf_counter()
        results = replica_study(
            scenario,
            counts,
            strategies,
            skew=args.client_skew,
            signal_interval_s=args.signal_interval,
            signal_delay_s=args.signal_delay,
        )
    except ValueError as error:
        print(f"irmiddleware simulate: {error}", file=sys.stderr)
        return 2
    fleet = scenario.fleet
    print(
        f"{len(fleet)} accelerators (capacity {min(fleet.capacities)}-{max(fleet.capacities)}), "
        f"{scenario.requests} chat sessions, replica 0 gets {args.client_skew:g}x each other's traffic, "
        f"signals every {args.signal_interval:g} s + {args.signal_delay:g} s delay, seed {scenario.seed}"
    )
    print()
    print(format_replica_table(results))
    print(f"\n(simulated in {time.perf_counter() - started:.1f} s wall time)")
    return 0
