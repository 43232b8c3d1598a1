"""`irmiddleware bench-replicas`: balance across router replicas that share no state.

Several `irmiddleware serve` processes (replicas, as behind a Kubernetes Service or an L4
balancer) route to the same emulated vLLM servers, all child processes on 127.0.0.1. Clients hit
the replicas unevenly (by default 3:1) with requests of mixed length, closed loop, bounded in
count and in time. Each replica counts only its own requests in flight; `queue_aware` adds what
every engine reports on its Prometheus page (running + waiting, minus the replica's own requests
there), so a replica sees the others' load through the engines, one scrape interval late.

For each strategy the same run is repeated on fresh replicas (median of `--repeats`) and the
backend side is read from the emulators' own counters: requests served per backend, the peak in
progress, and the mean in progress sampled every 50 ms. The imbalance is max/mean of the mean in
progress over the backends (1.00 is even). Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from irmiddleware.bench._harness import emulated_vllm, format_table, local_url, serving

__all__ = [
    "Replica",
    "ReplicaRun",
    "bench_replicas_main",
    "emulated_fleet",
    "replica_config",
    "replica_routers",
    "run_uneven_load",
]

_SAMPLE_INTERVAL_S = 0.05
# Slow enough tokens that the servers, not the two shared cores, are what the clients wait for.
_TOKEN_S = 0.02
_STRATEGIES = ("queue_aware", "least_connections", "p2c")


def replica_config(
    backends: Sequence[str],
    listen: str,
    strategy: str,
    *,
    capacity: int,
    signals_interval_s: float = 0.1,
) -> str:
    """The router file of one replica: every replica of a fleet gets the same one (but `listen`)."""
    lines = ["[router]", f'listen = "{listen.removeprefix("http://")}"', f'strategy = "{strategy}"']
    lines += ["", "[router.signals]", f"interval_s = {signals_interval_s}", ""]
    for url in backends:
        lines += ["[[backends]]", f'url = "{url}"', f"capacity = {capacity}", 'models = ["m"]', ""]
    return "\n".join(lines)


@contextlib.contextmanager
def emulated_fleet(count: int, *, max_num_seqs: int, time_per_output_token_s: float) -> Iterator[list[str]]:
    """`count` emulated vLLM servers serving model "m", as child processes; yields their URLs."""
    urls = [local_url() for _ in range(count)]
    with contextlib.ExitStack() as stack:
        for url in urls:
            stack.enter_context(
                emulated_vllm(url, max_num_seqs=max_num_seqs, time_per_output_token_s=time_per_output_token_s)
            )
        yield urls


@dataclass
class Replica:
    """A running `irmiddleware serve` replica: its URL and router file (rewritten by `reload`)."""

    url: str
    config_path: str
    process: subprocess.Popen[bytes]

    def reload(self, text: str) -> None:
        """Rewrites the router file and sends SIGHUP: the replica applies its `[[backends]]`."""
        with open(self.config_path, "w") as file:
            file.write(text)
        self.process.send_signal(signal.SIGHUP)


@contextlib.contextmanager
def replica_routers(configs: Sequence[str]) -> Iterator[list[Replica]]:
    """One `irmiddleware serve` process per router file in `configs` (each with its own `listen`),
    until the block ends."""
    with contextlib.ExitStack() as stack:
        replicas = []
        for text in configs:
            url = "http://" + text.split('listen = "', 1)[1].split('"', 1)[0]
            with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as file:
                file.write(text)
            stack.callback(os.unlink, file.name)
            command = ["-m", "irmiddleware", "serve", "--config", file.name, "--log-level", "warning"]
            replicas.append(Replica(url, file.name, stack.enter_context(serving(command, url))))
        yield replicas


@dataclass
class ReplicaRun:
    """What one load run did, seen from the clients and from the backends."""

    sent: list[int]
    """Requests sent through each replica."""
    failed: int
    """Requests not answered 200 (overload, errors)."""
    served: list[int]
    """Requests each backend completed during the run."""
    peak: list[int]
    """The most requests each backend held at once during the run."""
    mean_in_progress: list[float] = field(default_factory=list)
    """Each backend's requests in progress, averaged over the samples."""
    elapsed_s: float = 0.0
    """From the first request to the last answer."""

    @property
    def imbalance(self) -> float:
        """max/mean of the backends' mean in progress (1.0 is even; NaN before any sample)."""
        mean = statistics.fmean(self.mean_in_progress) if self.mean_in_progress else 0.0
        return max(self.mean_in_progress) / mean if mean > 0 else float("nan")


async def _stats(client: httpx.AsyncClient, backends: Sequence[str]) -> list[dict[str, Any]]:
    answers = await asyncio.gather(*(client.get(f"{url}/_emulator/stats") for url in backends))
    return [answer.json() for answer in answers]


async def run_uneven_load(
    routers: Sequence[str],
    backends: Sequence[str],
    *,
    clients: Sequence[int],
    requests: int,
    time_limit_s: float,
    seed: int = 1,
) -> ReplicaRun:
    """`clients[i]` closed-loop clients on replica i until `requests` are sent in all or
    `time_limit_s` passes; each request asks for 2 to 30 tokens (seeded). Reads the backends'
    counters before and after, and samples their requests in progress meanwhile."""
    limits = httpx.Limits(max_connections=sum(clients) + 8, max_keepalive_connections=sum(clients) + 8)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await asyncio.gather(*(client.post(f"{url}/_emulator/reset-peak") for url in backends))
        before = await _stats(client, backends)
        rng = random.Random(seed)
        lengths = [rng.randint(2, 30) for _ in range(requests)]
        sent, failed = [0] * len(routers), [0]
        tickets = iter(range(requests))
        deadline = time.monotonic() + time_limit_s

        async def one_client(replica: int) -> None:
            for ticket in tickets:
                if time.monotonic() > deadline:
                    return
                sent[replica] += 1
                body = {"model": "m", "prompt": "Hello", "max_tokens": lengths[ticket], "ignore_eos": True}
                with contextlib.suppress(httpx.HTTPError):
                    if (
                        await client.post(f"{routers[replica]}/v1/completions", json=body)
                    ).status_code == 200:
                        continue
                failed[0] += 1

        sampler = asyncio.create_task(_sample(client, backends))
        started = time.monotonic()
        try:
            await asyncio.gather(*(one_client(r) for r, count in enumerate(clients) for _ in range(count)))
        finally:
            sampler.cancel()
        samples = await asyncio.gather(sampler, return_exceptions=True)
        elapsed_s = time.monotonic() - started
        after = await _stats(client, backends)
    totals = samples[0] if isinstance(samples[0], list) else []
    return ReplicaRun(
        sent=sent,
        failed=failed[0],
        served=[a["completed"] - b["completed"] for a, b in zip(after, before, strict=True)],
        peak=[a["peak_in_progress"] for a in after],
        mean_in_progress=totals,
        elapsed_s=elapsed_s,
    )


async def _sample(client: httpx.AsyncClient, backends: Sequence[str]) -> list[float]:
    """Samples the backends' requests in progress until cancelled; returns each one's mean."""
    totals, rounds = [0] * len(backends), 0
    try:
        while True:
            for index, stats in enumerate(await _stats(client, backends)):
                totals[index] += stats["in_progress"]
            rounds += 1
            await asyncio.sleep(_SAMPLE_INTERVAL_S)
    except asyncio.CancelledError:
        return [total / rounds for total in totals] if rounds else []


def _one_run(backends: list[str], strategy: str, args: argparse.Namespace, seed: int) -> ReplicaRun:
    configs = [
        replica_config(
            backends, local_url(), strategy, capacity=args.capacity, signals_interval_s=args.interval
        )
        for _ in args.clients
    ]
    with replica_routers(configs) as replicas:
        return asyncio.run(
            run_uneven_load(
                [replica.url for replica in replicas],
                backends,
                clients=args.clients,
                requests=args.requests,
                time_limit_s=args.time_limit,
                seed=seed,
            )
        )


def _row(strategy: str, runs: list[ReplicaRun]) -> tuple[str, ...]:
    # The run whose imbalance is the median stands for the strategy (its counts are shown whole).
    ranked = sorted(runs, key=lambda run: run.imbalance)
    median = ranked[len(ranked) // 2]
    spread = f"{ranked[0].imbalance:.2f}-{ranked[-1].imbalance:.2f}"
    return (
        strategy,
        f"{median.imbalance:.2f}",
        spread,
        " ".join(f"{m:4.1f}" for m in median.mean_in_progress),
        " ".join(f"{p:3d}" for p in median.peak),
        " ".join(f"{s:4d}" for s in median.served),
        f"{max(median.served) / statistics.fmean(median.served):.2f}" if any(median.served) else "n/a",
        f"{sum(median.served) / median.elapsed_s:.1f}" if median.elapsed_s > 0 else "n/a",
        str(median.failed),
    )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="irmiddleware bench-replicas", description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, default=4, help="emulated vLLM servers (default 4)")
    parser.add_argument(
        "--clients", default="15,3", help="closed-loop clients per replica, comma-separated (default 15,3)"
    )
    parser.add_argument("--requests", type=int, default=600, help="requests per run, all replicas (600)")
    parser.add_argument("--time-limit", type=float, default=30.0, help="seconds per run at most (30)")
    parser.add_argument("--capacity", type=int, default=8, help="each replica's capacity per backend (8)")
    parser.add_argument("--interval", type=float, default=0.1, help="signal scrape interval, s (0.1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per strategy; the median is shown (3)")
    parser.add_argument("--strategies", default=",".join(_STRATEGIES), help="comma-separated")
    args = parser.parse_args(argv)
    try:
        args.clients = [int(count) for count in args.clients.split(",")]
    except ValueError:
        parser.error("--clients must be integers separated by commas")
    args.strategies = args.strategies.split(",")
    if not 2 <= args.backends <= 16 or not 2 <= len(args.clients) <= 8 or min(args.clients) < 1:
        parser.error("--backends must be in 2..16, --clients 2 to 8 positive counts")
    if not 10 <= args.requests <= 20_000 or not 1 <= args.time_limit <= 600 or not 1 <= args.repeats <= 9:
        parser.error("--requests must be in 10..20000, --time-limit in 1..600 s, --repeats in 1..9")
    return args


def bench_replicas_main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and prints the table; returns 0."""
    args = _parse(argv)
    with emulated_fleet(args.backends, max_num_seqs=4, time_per_output_token_s=_TOKEN_S) as backends:
        split = ":".join(map(str, args.clients))
        print(
            f"{len(args.clients)} replicas, clients {split}, {args.backends} emulated vLLM (4 running"
            f" each, {_TOKEN_S * 1000:g} ms a token, 2-30 tokens), capacity {args.capacity} per replica"
            f" and backend, signals every {args.interval:g} s; {args.requests} requests per run,"
            f" median of {args.repeats}"
        )
        rows = []
        for strategy in args.strategies:
            runs = [_one_run(backends, strategy, args, seed) for seed in range(1, args.repeats + 1)]
            rows.append(_row(strategy, runs))
        header = (
            "strategy",
            "imbalance",
            "range",
            "mean in progress",
            "peak",
            "served",
            "served max/mean",
            "req/s",
            "failed",
        )
        print(format_table(header, rows))
    return 0
