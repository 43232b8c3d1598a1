"""`irmiddleware simulate`: compare routing strategies on one seeded, simulated workload."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from irmiddleware.sim._chat import ChatWorkload, session_rate
from irmiddleware.sim._engine import (
    AFFINITY_STRATEGIES,
    DEFAULT_STRATEGIES,
    Scenario,
    compare,
    default_strategies,
)
from irmiddleware.sim._model import (
    ArrivalProcess,
    BurstyArrivals,
    Failure,
    Fleet,
    LlmWorkload,
    PoissonArrivals,
    SpeedChange,
    TraceArrivals,
    UniformWorkload,
    Workload,
    make_fleet,
    offered_rate,
)
from irmiddleware.sim._replica_cli import add_replica_options, run_replica_study
from irmiddleware.sim._shares import format_phases, format_shares
from irmiddleware.sim._stats import StrategyResult, format_histograms, format_table
from irmiddleware.sim._theory import DEFAULT_SIZES, balls_into_bins, format_balls_into_bins

_PROGRESS_ENV = "IRM_PROGRESS"  # "1" forces the progress bar on (e.g. under a pipe), "0" off.


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irmiddleware simulate",
        description="Discrete-event simulation of a fleet: every decision and release goes through "
        "the native core. Prints one row per strategy; the same --seed gives the same numbers.",
    )
    parser.add_argument("--accelerators", type=int, default=200, help="fleet size (default 200)")
    parser.add_argument(
        "--requests", type=int, default=100_000, help="requests per strategy (default 100000)"
    )
    parser.add_argument(
        "--strategies",
        help=f"comma-separated (default {','.join(DEFAULT_STRATEGIES)}; "
        f"with --workload chat {','.join(AFFINITY_STRATEGIES)})",
    )
    parser.add_argument(
        "--workload", choices=("uniform", "llm", "chat"), default="llm", help="chat: multi-turn sessions"
    )
    _add_chat_options(parser)
    add_replica_options(parser)
    parser.add_argument("--arrival", choices=("poisson", "bursty", "trace"), default="poisson")
    parser.add_argument("--trace", type=Path, help="CSV or JSONL with time[, prompt_tokens, output_tokens]")
    parser.add_argument("--load", type=float, default=0.8, help="offered load, 1.0 = all batches full")
    parser.add_argument("--heterogeneity", type=float, default=1.0, help="speed spread h: [1/(1+h), 1+h]")
    parser.add_argument("--capacity", type=int, default=32, help="batch slots of a speed-1 accelerator")
    parser.add_argument(
        "--uniform-capacity", action="store_true", help="same capacity everywhere, not scaled with speed"
    )
    parser.add_argument(
        "--fail",
        action="append",
        default=[],
        metavar="INDEX:DOWN[:UP]",
        help="take an accelerator down, e.g. 3:10:25 (repeatable)",
    )
    parser.add_argument(
        "--on-failure", choices=("fail", "finish"), default="fail", help="fate of in-flight work"
    )
    _add_speed_options(parser)
    parser.add_argument("--retries", type=int, default=0, help="retries of a rejected request")
    parser.add_argument("--backoff", type=float, default=0.05, help="first retry delay, seconds (doubles)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--plot", type=Path, metavar="OUT.png", help="latency tails and load (needs matplotlib)"
    )
    parser.add_argument("--histogram", action="store_true", help="also print the utilisation histograms")
    parser.add_argument(
        "--balls-into-bins", action="store_true", help="check balls-into-bins bounds (no simulation)"
    )
    parser.add_argument(
        "--bins", type=int, nargs="+", default=list(DEFAULT_SIZES), help="n for --balls-into-bins"
    )
    return parser


def _add_chat_options(parser: argparse.ArgumentParser) -> None:
    chat = parser.add_argument_group("--workload chat (sessions sharing a system prompt, prefix caches)")
    chat.add_argument("--sessions", type=int, default=2_000, help="sessions (default 2000; not --requests)")
    chat.add_argument("--turns", default="2:8", metavar="MIN:MAX", help="turns per session (default 2:8)")
    chat.add_argument("--system-tokens", type=int, default=1_024, help="shared system prompt (default 1024)")
    chat.add_argument("--system-prompts", type=int, default=1, help="distinct system prompts (default 1)")
    chat.add_argument("--think", type=float, default=10.0, help="mean think time between turns, s")
    chat.add_argument(
        "--cache-blocks",
        type=int,
        default=256,
        help="prefix cache per batch slot, 16-token blocks (default 256)",
    )
    chat.add_argument(
        "--epsilon", type=float, default=0.25, help="bounded-load slack of the core (default 0.25)"
    )


def _add_speed_options(parser: argparse.ArgumentParser) -> None:
    speed = parser.add_argument_group("speeds and learned speed (least_ttft)")
    speed.add_argument(
        "--speeds",
        metavar="S1,S2,...",
        help="the accelerators' speeds (sets the fleet size; capacities follow unless --uniform-capacity)",
    )
    speed.add_argument(
        "--slow",
        action="append",
        default=[],
        metavar="INDEX:FROM[:UNTIL[:FACTOR]]",
        help="slow an accelerator FACTOR (2) times from FROM to UNTIL seconds, e.g. 2:60:120 (repeatable)",
    )
    speed.add_argument("--block-cost", type=float, help="least_ttft's cost units per uncached prompt block")
    speed.add_argument(
        "--learn-speed",
        choices=("auto", "on", "off"),
        default="auto",
        help="learned speed sets the core's weights: auto = for least_ttft only",
    )
    speed.add_argument(
        "--shares",
        type=float,
        metavar="SECONDS",
        help="print the share over time of the first --slow accelerator (else 0), in windows of SECONDS"
        " (with --plot, also drawn in OUT-shares.png)",
    )


def simulate_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.balls_into_bins:
        print(format_balls_into_bins(balls_into_bins(args.bins, args.seed)))
        return 0
    if args.replicas:
        args.workload = "chat"  # the study is about sessions and caches across replicas
        return run_replica_study(args, _scenario)
    try:
        scenario = _scenario(args)
    except (OSError, ValueError) as error:
        print(f"irmiddleware simulate: {error}", file=sys.stderr)
        return 2
    problem = _plot_problem(args.plot)
    if problem:  # Found before a long run, not after it.
        print(f"irmiddleware simulate: {problem}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    bar = _ProgressBar.for_stderr()
    try:
        strategies = args.strategies.split(",") if args.strategies else default_strategies(scenario)
        results = compare(scenario, strategies, progress=bar.update if bar else None)
    except ValueError as error:  # An unknown strategy name, or a malformed trace row.
        print(f"irmiddleware simulate: {error}", file=sys.stderr)
        return 2
    finally:
        if bar:
            bar.close()
    _print_report(scenario, results, time.perf_counter() - started, args.histogram)
    if args.shares:
        _print_shares(scenario, results, args.shares)
    if args.plot is not None:
        from irmiddleware.sim._plot import plot_comparison

        title = _describe(scenario, results[0].requests if results else 0)
        plot_comparison(results, args.plot, title=title)
        print(f"plot written to {args.plot}")
        if args.shares:
            from irmiddleware.sim._shares import plot_shares

            shares_path = args.plot.with_name(f"{args.plot.stem}-shares{args.plot.suffix}")
            accelerator = scenario.speed_changes[0].accelerator if scenario.speed_changes else 0
            plot_shares(results, accelerator, args.shares, shares_path, title=title)
            print(f"share plot written to {shares_path}")
    return 0


def _fleet(args: argparse.Namespace) -> Fleet:
    if args.speeds is None:
        return make_fleet(
            args.accelerators,
            heterogeneity=args.heterogeneity,
            capacity=args.capacity,
            capacity_follows_speed=not args.uniform_capacity,
            seed=args.seed,
        )
    speeds = tuple(float(speed) for speed in args.speeds.split(","))
    if args.uniform_capacity:
        capacities = (args.capacity,) * len(speeds)
    else:
        capacities = tuple(max(1, round(args.capacity * speed)) for speed in speeds)
    return Fleet(speeds, capacities)


def _scenario(args: argparse.Namespace) -> Scenario:
    fleet = _fleet(args)
    workload = _workload(args)
    return Scenario(
        fleet=fleet,
        workload=workload,
        arrivals=_arrivals(args, fleet, workload),
        requests=args.sessions if isinstance(workload, ChatWorkload) else args.requests,
        failures=tuple(Failure.parse(text) for text in args.fail),
        on_failure=args.on_failure,
        retries=args.retries,
        backoff_s=args.backoff,
        seed=args.seed,
        balance_epsilon=args.epsilon,
        speed_changes=tuple(SpeedChange.parse(text) for text in args.slow),
        learn_speed={"auto": None, "on": True, "off": False}[args.learn_speed],
        block_cost=args.block_cost,
    )


def _workload(args: argparse.Namespace) -> Workload:
    if args.workload == "llm":
        return LlmWorkload()
    if args.workload == "uniform":
        return UniformWorkload()
    turns = args.turns.split(":")
    if len(turns) != 2:
        raise ValueError(f"--turns expects MIN:MAX, got {args.turns!r}")
    return ChatWorkload(
        system_tokens=args.system_tokens,
        system_prompts=args.system_prompts,
        turns_min=int(turns[0]),
        turns_max=int(turns[1]),
        think_s=args.think,
        cache_blocks_per_slot=args.cache_blocks,
    )


def _arrivals(args: argparse.Namespace, fleet: Fleet, workload: Workload) -> ArrivalProcess:
    if args.arrival == "trace":
        if args.trace is None:
            raise ValueError("--arrival trace needs --trace FILE")
        if not args.trace.is_file():
            # A pipe would not do either: each strategy replays the file from its start.
            raise ValueError(f"no trace file {args.trace} (it must be a regular file)")
        return TraceArrivals(args.trace)
    if isinstance(workload, ChatWorkload):  # Arrivals start sessions.
        rate = session_rate(fleet, workload, args.load)
    else:
        rate = offered_rate(fleet, workload, args.load)
    return BurstyArrivals(rate) if args.arrival == "bursty" else PoissonArrivals(rate)


def _describe(scenario: Scenario, requests: int) -> str:
    fleet = scenario.fleet
    speeds = f"speeds {min(fleet.speeds):.2f}-{max(fleet.speeds):.2f}"
    capacities = f"capacity {min(fleet.capacities)}-{max(fleet.capacities)}"
    workload = scenario.workload
    sessions = f" in {scenario.requests} sessions" if isinstance(workload, ChatWorkload) else ""
    return (
        f"{len(fleet)} accelerators ({speeds}, {capacities}), {requests} {workload.name} "
        f"requests{sessions}, {scenario.arrivals.name} arrivals, seed {scenario.seed}"
    )


def _print_report(
    scenario: Scenario, results: Sequence[StrategyResult], elapsed_s: float, histogram: bool
) -> None:
    print(_describe(scenario, results[0].requests if results else 0))
    print()
    print(format_table(results))
    if histogram:
        print()
        print(format_histograms(results))
    for result in results:
        for outage in result.outages:
            up = "end" if outage.up_s is None else f"{outage.up_s:g} s"
            print(
                f"{result.strategy}: accelerator {outage.accelerator} down {outage.down_s:g} s..{up}, "
                f"routed to it meanwhile: {outage.routed_while_down}"
            )
    print(f"\n(simulated in {elapsed_s:.1f} s wall time)")


def _print_shares(scenario: Scenario, results: Sequence[StrategyResult], window_s: float) -> None:
    """The share over time of the first slowed accelerator (else accelerator 0); with a slowdown,
    from 4 windows before it to 8 windows after it ends."""
    accelerator, between = 0, (0.0, math.inf)
    if scenario.speed_changes:
        change = scenario.speed_changes[0]
        until_s = math.inf if change.until_s is None else change.until_s + 8 * window_s
        accelerator, between = change.accelerator, (change.from_s - 4 * window_s, until_s)
    table = format_shares(results, accelerator, window_s, between)
    print(f"\nshare of admissions over time, windows of {window_s:g} s\n{table}")
    if scenario.speed_changes and scenario.speed_changes[0].until_s is not None:
        change = scenario.speed_changes[0]
        assert change.until_s is not None
        phases = format_phases(results, change.accelerator, change.from_s, change.until_s)
        print(f"\nshare of admissions around the slowdown\n{phases}")


def _plot_problem(path: Path | None) -> str | None:
    if path is None:
        return None
    if not _matplotlib_available():
        return "--plot needs matplotlib: pip install 'irmiddleware[plot]'"
    if not path.parent.is_dir():
        return f"--plot: no directory {path.parent}"
    return None


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


class _ProgressBar:
    """A one-line bar on stderr, redrawn at most ten times a second."""

    _WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.drawn_s = 0.0

    @classmethod
    def for_stderr(cls) -> _ProgressBar | None:
        forced = os.environ.get(_PROGRESS_ENV)
        if forced == "0" or (forced != "1" and not sys.stderr.isatty()):
            return None
        return cls(sys.stderr)

    def update(self, strategy: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.drawn_s < 0.1 and done < total:
            return
        self.drawn_s = now
        filled = self._WIDTH * done // max(1, total)
        bar = "#" * filled + "." * (self._WIDTH - filled)
        self.stream.write(f"\r{strategy:>18} [{bar}] {done}/{total}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\r" + " " * (self._WIDTH + 50) + "\r")
        self.stream.flush()
