"""`irmiddleware bench-predict`: least_ttft against prefix_affinity end to end, in one run.

Four emulated vLLM servers (child processes on 127.0.0.1) with speeds 1, 1, 0.7 and 0.5 (their
prefill and decode steps take 1/speed as long), a few batch slots each and a prefix cache, behind
`irmiddleware serve` (a child process too, told each server's batch slots), driven by the
official `openai` client: seeded multi-turn chats sharing a system prompt, streamed, from
concurrent users with think times. The default load keeps the fleet about 70 % busy, so the
slower servers' batches fill and requests queue there, as on a fleet sized to its traffic.
Each strategy gets fresh servers (cold caches) and the same conversations, after a warm-up of
conversations of their own that are not counted (`--warmup`); users arrive over the first
2 x think time rather than all at once.

Phase 1 (steady speeds) prints, per strategy, the time to first token the client saw (median, p90,
p99), the servers' prefix-cache hit rate and how many requests each backend took. Phase 2 (the
same traffic; backend 0 slows 2x after a while, then recovers) prints its share of the router's
decisions per time window, read from the router's status document. Everything is bounded: a fixed
number of conversations, a deadline per phase. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

from irmiddleware.bench._harness import emulated_vllm, format_table, local_url, quantile, serving
from irmiddleware.bench._moves import explain, read_turns

__all__ = ["bench_predict_main"]

_SYSTEM = "You are a meticulous assistant for a travel agency. Answer with care and in detail. " * 24
_QUESTION = "Tell me more about the next leg of the journey, the trains, the hotels and the food. " * 3
_PHASE_DEADLINE_S = 300.0
_STRATEGIES = ("prefix_affinity", "least_ttft")


@dataclass
class _Run:
    failed: int = 0
    routed: dict[str, int] = field(default_factory=dict)
    weights: list[float] = field(default_factory=list)
    """The core's weight of each backend at the end (learned speed, with least_ttft)."""
    hit_rate: float = 0.0
    outcomes: dict[str, float] = field(default_factory=dict)
    """The router's affinity decisions by outcome (hit, miss, overload), warm-up included."""
    shares: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since the start, share of backend 0's decisions in the window ending then)."""
    turns: dict[tuple[int, int], float] = field(default_factory=dict)
    """(conversation, turn) -> time to first token."""
    prompt_chars: dict[tuple[int, int], int] = field(default_factory=dict)
    """(conversation, turn) -> characters of the messages sent."""
    explained: list[str] = field(default_factory=list)
    """`--explain`: the moves and slowest turns, from the router's access log."""

    @property
    def ttfts_s(self) -> list[float]:
        """Every answer's time to first token."""
        return list(self.turns.values())


@dataclass(frozen=True)
class _Plan:
    sessions: int
    turns: int
    users: int
    think_s: float
    seed: int
    max_tokens: int
    first: int = 0
    """The first conversation's number (conversations are numbered from it, each its own text)."""


async def _conversation(client: openai.AsyncOpenAI, number: int, plan: _Plan, run: _Run) -> None:
    rng = random.Random(f"{plan.seed}/{number}")
    history: list[ChatCompletionMessageParam] = [{"role": "system", "content": _SYSTEM}]
    for turn in range(plan.turns):
        history.append({"role": "user", "content": f"Session {number}, turn {turn}. {_QUESTION}"})
        run.prompt_chars[number, turn] = sum(len(str(message.get("content", ""))) for message in history)
        started = time.perf_counter()
        first = None
        text = []
        try:
            stream = await client.chat.completions.create(
                model="m",
                messages=history,
                max_tokens=plan.max_tokens,
                stream=True,
                # Names the turn in the router's access log (`--access-log`): which backend each
                # turn of each conversation went to, the moves that cost a cache refill.
                extra_headers={"x-request-id": f"c{number}-t{turn}"},
            )
            async for chunk in stream:
                if first is None:
                    first = time.perf_counter() - started
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
        except openai.APIError:
            run.failed += 1
            return
        if first is not None:
            run.turns[number, turn] = first
        history.append({"role": "assistant", "content": "".join(text)})
        await asyncio.sleep(rng.expovariate(1 / plan.think_s))


async def _drive(router: str, plan: _Plan, run: _Run) -> None:
    client = openai.AsyncOpenAI(base_url=router + "/v1", api_key="x", max_retries=0, timeout=60)
    pending = iter(range(plan.first, plan.first + plan.sessions))

    async def user(index: int) -> None:
        # Users arrive one by one (a think time apart on average), as people do, rather than all
        # in the same millisecond: a burst of cold prefills on a fleet whose speeds nobody has
        # seen yet would otherwise make the whole p99 of a few hundred answers.
        await asyncio.sleep(random.Random(f"{plan.seed}/user/{index}").uniform(0, 2 * plan.think_s))
        for number in pending:  # Users take the next conversation until none is left.
            await _conversation(client, number, plan, run)

    try:
        users = (user(index) for index in range(plan.users))
        await asyncio.wait_for(asyncio.gather(*users), _PHASE_DEADLINE_S)
    finally:
        await client.close()


async def _watch_shares(router: str, backend: str, window_s: float, run: _Run, stop: asyncio.Event) -> None:
    """Every `window_s`, backend's share of the decisions made since the previous look."""
    started = time.perf_counter()
    previous: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=5) as client:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), window_s)
            routed = {
                b["url"]: b["routed"] for b in (await client.get(router + "/irm/status")).json()["backends"]
            }
            delta = {url: count - previous.get(url, 0) for url, count in routed.items()}
            previous = routed
            total = sum(delta.values())
            run.shares.append(
                (time.perf_counter() - started, delta.get(backend, 0) / total if total else 0.0)
            )


async def _slow_for_a_while(backend: str, speed: float, slow_at_s: float, slow_for_s: float) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        await asyncio.sleep(slow_at_s)
        await client.post(backend + "/_emulator/config", json={"speed": speed / 2})
        await asyncio.sleep(slow_for_s)
        await client.post(backend + "/_emulator/config", json={"speed": speed})


def _outcomes(router: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in httpx.get(router + "/metrics").text.splitlines():
        if line.startswith("irm_affinity_decisions_total{"):
            outcome = line.partition('outcome="')[2].partition('"')[0]
            counts[outcome] = counts.get(outcome, 0.0) + float(line.split()[-1])
    return counts


def _hit_rate(backends: list[str]) -> float:
    queries = hits = 0.0
    for url in backends:
        for line in httpx.get(url + "/metrics").text.splitlines():
            if line.startswith("vllm:prefix_cache_queries_total"):
                queries += float(line.split()[-1])
            elif line.startswith("vllm:prefix_cache_hits_total"):
                hits += float(line.split()[-1])
    return hits / queries if queries else 0.0


@contextlib.contextmanager
def _fleet(args: argparse.Namespace, strategy: str, log: IO[bytes] | None) -> Iterator[tuple[str, list[str]]]:
    """Fresh emulators and a router in front of them: (router URL, backend URLs); the router's
    stderr (its access log, with `--explain` or `--access-log`) goes to `log` when given."""
    speeds = [float(speed) for speed in args.speeds.split(",")]
    backends = [local_url() for _ in speeds]
    router = local_url()
    with contextlib.ExitStack() as stack:
        for url, speed in zip(backends, speeds, strict=True):
            stack.enter_context(
                emulated_vllm(
                    url,
                    max_num_seqs=args.slots,
                    time_per_output_token_s=args.decode_s,
                    time_per_prompt_token_s=args.prefill_s,
                    prefix_cache_blocks=args.cache_blocks,
                    speed=speed,
                    seed=args.seed,
                )
            )
        config = stack.enter_context(tempfile.TemporaryDirectory())
        path = Path(config) / "router.toml"
        path.write_text(_config_toml(strategy, router, backends, args))
        stack.enter_context(
            serving(
                ["-m", "irmiddleware", "serve", "--config", str(path), "--log-level", args.log_level],
                router,
                stderr=log,
            )
        )
        yield router, backends


def _config_toml(strategy: str, router: str, backends: list[str], args: argparse.Namespace) -> str:
    lines = [
        "[router]",
        f'strategy = "{strategy}"',
        f'listen = "{router.removeprefix("http://")}"',
        f'cost = "{args.cost}"',
    ]
    if args.access_log or args.explain:
        lines += ["access_log = true", 'log_format = "json"']
    for url in backends:
        lines += ["[[backends]]", f'url = "{url}"', 'models = ["m"]', f"capacity = {args.capacity}"]
        # The emulators' batch slots, as an operator knows them (least_ttft reads them).
        lines.append(f"batch_slots = {args.slots}")
    return "\n".join(lines) + "\n"


def _phase(args: argparse.Namespace, plan: _Plan, strategy: str, slowdown: bool) -> _Run:
    run = _Run()
    explaining = args.explain and not slowdown
    with (
        tempfile.TemporaryFile() if explaining else contextlib.nullcontext() as log,
        contextlib.ExitStack() as fleet,
    ):
        router, backends = fleet.enter_context(_fleet(args, strategy, log))

        async def main() -> None:
            if args.warmup:
                # Conversations of their own, not counted: the servers' caches hold the system
                # prompt and the router has seen every backend answer before the measurement.
                warm = dataclasses.replace(plan, sessions=args.warmup, first=plan.sessions)
                await _drive(router, warm, _Run())
            stop = asyncio.Event()
            watcher = asyncio.create_task(_watch_shares(router, backends[0], args.window, run, stop))
            slow = None
            if slowdown:
                speed = float(args.speeds.split(",")[0])
                slow = asyncio.create_task(_slow_for_a_while(backends[0], speed, args.slow_at, args.slow_for))
            try:
                await _drive(router, plan, run)
            finally:
                stop.set()
                await watcher
                if slow is not None:
                    slow.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await slow

        asyncio.run(main())
        status = httpx.get(router + "/irm/status").json()
        run.routed = {b["url"]: b["routed"] for b in status["backends"]}
        weights = {b["url"]: b["weight"] for b in status["backends"]}
        run.weights = [weights[url] for url in backends]
        run.hit_rate = _hit_rate(backends)
        run.outcomes = _outcomes(router)
        run.routed = {f"backend {backends.index(url)}": count for url, count in run.routed.items()}
        if log is not None:
            fleet.close()  # the router has stopped: its log is whole
            log.seek(0)
            turns = read_turns(log.read().decode("utf-8", "replace").splitlines())
            run.explained = explain(turns, run.turns, run.prompt_chars, len(_SYSTEM), backends)
    return run


def _ttft_row(strategy: str, run: _Run) -> list[str]:
    ms = [f"{quantile(run.ttfts_s, q) * 1000:.0f}" for q in (0.5, 0.9, 0.99)]
    routed = " ".join(str(count) for _name, count in sorted(run.routed.items()))
    weights = " ".join(f"{weight:.2f}" for weight in run.weights)
    decisions = sum(run.outcomes.values())
    affine = f"{100 * run.outcomes.get('hit', 0.0) / decisions:.1f}" if decisions else "-"
    hit = f"{100 * run.hit_rate:.1f}"
    return [strategy, str(len(run.ttfts_s)), str(run.failed), *ms, hit, affine, routed, weights]


def _share_table(runs: dict[str, _Run], args: argparse.Namespace) -> str:
    rows = []
    count = max(len(run.shares) for run in runs.values())
    for index in range(count):
        at = next(run.shares[index][0] for run in runs.values() if index < len(run.shares))
        phase = "slow" if args.slow_at < at <= args.slow_at + args.slow_for + args.window else ""
        cells = [
            f"{100 * run.shares[index][1]:.0f} %" if index < len(run.shares) else "-" for run in runs.values()
        ]
        rows.append([f"{at:.0f}", phase, *cells])
    return format_table(["t, s", "", *runs], rows)


def _plot(steady: dict[str, _Run], slowed: dict[str, _Run] | None, args: argparse.Namespace) -> None:
    """Time to first token tails (phase 1) and backend 0's share over time (phase 2), one file
    (matplotlib, an optional extra, imported only when a plot is asked for)."""
    import matplotlib

    matplotlib.use("Agg")  # Files only: no display needed, none wanted.
    import matplotlib.pyplot as plt

    panels = 1 if slowed is None else 2
    figure, axes = plt.subplots(
        1, panels, figsize=(5.6 * panels, 4.0), constrained_layout=True, squeeze=False
    )
    tails = axes[0][0]
    for strategy, run in steady.items():
        # The complementary CDF on log axes: the tail is where the strategies differ.
        values = sorted(run.ttfts_s)
        count = len(values)
        tails.plot(
            [1000 * value for value in values],
            [max(1 - (index + 1) / count, 0.5 / count) for index in range(count)],
            label=strategy,
        )
    tails.set_xscale("log")
    tails.set_yscale("log")
    tails.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labels overlap otherwise
    tails.set_xlabel("time to first token, ms (client side)")
    tails.set_ylabel("fraction of answers slower")
    tails.grid(True, which="both", alpha=0.3)
    tails.legend()
    if slowed is not None:
        shares = axes[0][1]
        for strategy, run in slowed.items():
            shares.plot(
                [at for at, _ in run.shares], [100 * share for _, share in run.shares], label=strategy
            )
        shares.axvspan(
            args.slow_at, args.slow_at + args.slow_for, color="grey", alpha=0.15, label="2x slower"
        )
        shares.set_xlabel("seconds since the start of the phase")
        shares.set_ylabel("backend 0's share of decisions, %")
        shares.grid(True, alpha=0.3)
        shares.legend()
    figure.suptitle(f"bench-predict: speeds {args.speeds}, {args.users} users, seed {args.seed}", fontsize=9)
    figure.savefig(args.plot, dpi=110)
    plt.close(figure)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="irmiddleware bench-predict", description=__doc__)
    parser.add_argument("--speeds", default="1,1,0.7,0.5", help="emulators' speeds (default 1,1,0.7,0.5)")
    parser.add_argument("--sessions", type=int, default=192, help="conversations per phase (default 192)")
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation (default 4)")
    parser.add_argument("--users", type=int, default=20, help="concurrent users (default 20)")
    parser.add_argument("--think", type=float, default=0.5, help="mean think time, s (default 0.5)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--slots", type=int, default=4, help="emulator batch slots (default 4)")
    parser.add_argument("--capacity", type=int, default=8, help="router capacity per backend (default 8)")
    parser.add_argument(
        "--prefill-s", type=float, default=0.0002, help="s per uncached prompt token at speed 1"
    )
    parser.add_argument(
        "--decode-s", type=float, default=0.03, help="s per output token at speed 1 (default 0.03)"
    )
    parser.add_argument("--cache-blocks", type=int, default=512, help="emulator prefix cache, blocks")
    parser.add_argument("--cost", choices=("requests", "tokens"), default="requests")
    parser.add_argument("--slow-at", type=float, default=15.0, help="phase 2: backend 0 slows 2x at (s)")
    parser.add_argument("--slow-for", type=float, default=15.0, help="phase 2: for this long (s)")
    parser.add_argument("--window", type=float, default=2.0, help="share windows, s (default 2)")
    parser.add_argument(
        "--warmup", type=int, default=16, help="conversations of warm-up, not counted (default 16)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip-slowdown", action="store_true")
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="the routers' access logs (JSON lines: backend, time to first byte) on stderr",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="phase 1: each strategy's moves (turns sent away from the previous turn's backend), the "
        "prompt characters they refilled, and its slowest turns (from the router's access log)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="phase 1 runs per strategy, alternated; prints each and their medians (default 1)",
    )
    parser.add_argument("--plot", type=Path, help="write the plot (time to first token tails, shares) here")
    return parser


def bench_predict_main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.log_level = "info" if args.access_log else "warning"
    if not 1 <= args.sessions <= 10_000 or not 1 <= args.turns <= 50 or not 1 <= args.users <= 256:
        parser.error("--sessions must be in 1..10000, --turns in 1..50 and --users in 1..256")
    if not 0 <= args.warmup <= 10_000:
        parser.error("--warmup must be in 0..10000")
    if not 1 <= args.repeats <= 20:
        parser.error("--repeats must be in 1..20")
    plan = _Plan(args.sessions, args.turns, args.users, args.think, args.seed, args.max_tokens)
    print(
        f"{args.sessions} conversations x {args.turns} turns, {args.users} users, speeds {args.speeds}, "
        f"{args.slots} slots per emulator, router capacity {args.capacity}, cost = {args.cost}, "
        f"{args.warmup} conversations of warm-up, seed {args.seed}"
    )
    # Alternated (a, b, a, b, ...) so that a change in the machine's load falls on both.
    repeated = [
        {strategy: _phase(args, plan, strategy, slowdown=False) for strategy in _STRATEGIES}
        for _ in range(args.repeats)
    ]
    steady = repeated[0]
    header = [
        "strategy",
        "answers",
        "failed",
        "ttft p50 ms",
        "p90",
        "p99",
        "hit %",
        "affine %",
        "routed per backend",
        "weights",
    ]
    rows = [_ttft_row(s, r) for runs in repeated for s, r in runs.items()]
    print("\nphase 1: steady speeds\n" + format_table(header, rows))
    p99s = {s: [quantile(runs[s].ttfts_s, 0.99) for runs in repeated] for s in _STRATEGIES}
    hits = {s: [runs[s].hit_rate for runs in repeated] for s in _STRATEGIES}
    baseline, ours = (statistics.median(p99s[s]) for s in _STRATEGIES)
    median = f"median of {args.repeats} runs " if args.repeats > 1 else ""
    print(
        f"least_ttft p99 time to first token {median}{100 * (1 - ours / baseline):.0f} % lower than "
        f"prefix_affinity's ({1000 * ours:.0f} against {1000 * baseline:.0f} ms); hit rate "
        + " against ".join(f"{100 * statistics.median(hits[s]):.1f} %" for s in reversed(_STRATEGIES))
    )
    if args.repeats > 1:
        # The answers of every run together: a p99 of --repeats times as many, steadier than any one.
        pa, lt = (quantile([t for runs in repeated for t in runs[s].ttfts_s], 0.99) for s in _STRATEGIES)
        print(
            f"pooled over the runs: {100 * (1 - lt / pa):.0f} % lower "
            f"({1000 * lt:.0f} against {1000 * pa:.0f} ms)"
        )
    for number, runs in enumerate(repeated):
        for strategy, run in runs.items():
            if run.explained:
                print(f"\n{strategy}, run {number + 1}: " + "\n".join(run.explained))
    if args.skip_slowdown:
        if args.plot:
            _plot(steady, None, args)
        return 0
    slowed = {strategy: _phase(args, plan, strategy, slowdown=True) for strategy in _STRATEGIES}
    print(
        f"\nphase 2: backend 0 twice as slow from {args.slow_at:g} s to {args.slow_at + args.slow_for:g} s; "
        f"its share of decisions per {args.window:g} s window\n" + _share_table(slowed, args)
    )
    print("\n" + format_table(header, [_ttft_row(s, r) for s, r in slowed.items()]))
    if args.plot:
        _plot(steady, slowed, args)
    return 0
