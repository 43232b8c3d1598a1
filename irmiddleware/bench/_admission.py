"""`irmiddleware bench-admission`: what priority classes buy the top class under overload.

Two emulated vLLM backends (real per-token time, small `max_num_seqs`) and the router
(`irmiddleware serve --config`) run as child processes on 127.0.0.1. The same open-loop workload,
offered faster than the fleet can serve (20% of requests class 0, the rest class 6), runs twice:
with priority classes (the `x-irm-priority` header is read) and without (the header is ignored, so
every request is class 0 and the queue is plain FIFO). Prints the top class's p50/p99 latency and
the shed counts of both runs. Bounded: `--requests` at most 20000, every request times out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import httpx

from irmiddleware.bench._harness import emulated_vllm, local_url, quantile, serving

__all__ = ["bench_admission_main"]

_TOP, _BATCH = 0, 6
_BODY = {"model": "m", "prompt": "Hello", "max_tokens": 8, "ignore_eos": True}


@dataclass
class _Run:
    latencies_s: dict[int, list[float]] = field(default_factory=lambda: {_TOP: [], _BATCH: []})
    shed: dict[int, int] = field(default_factory=lambda: {_TOP: 0, _BATCH: 0})


def _config(backends: list[str], listen: str, classes: bool) -> str:
    lines = ["[router]", f'listen = "{listen}"', 'strategy = "least_connections"', "", "[admission]"]
    lines += [f'header = "{"x-irm-priority" if classes else ""}"', "body_priority = false"]
    lines += ["max_queue = 200", "max_wait_s = 2.0", "aging_s = 0.0", ""]
    for url in backends:
        lines += ["[[backends]]", f'url = "{url}"', "capacity = 4", 'models = ["m"]', ""]
    return "\n".join(lines)


async def _workload(url: str, count: int, rate_per_s: float) -> _Run:
    run = _Run()
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def one(index: int) -> None:
            await asyncio.sleep(index / rate_per_s)  # open loop: arrivals do not wait for answers
            priority = _TOP if index % 5 == 0 else _BATCH
            started = time.perf_counter()
            try:
                response = await client.post(
                    "/v1/completions", json=_BODY, headers={"x-irm-priority": str(priority)}
                )
            except httpx.HTTPError:
                run.shed[priority] += 1
                return
            if response.status_code == 200:
                run.latencies_s[priority].append(time.perf_counter() - started)
            else:
                run.shed[priority] += 1

        await asyncio.gather(*(one(index) for index in range(count)))
    return run


def _ms(values: list[float], q: float) -> str:
    value = quantile(values, q)
    return "    n/a" if math.isnan(value) else f"{value * 1000:7.1f}"


def _report(name: str, run: _Run) -> None:
    top, batch = run.latencies_s[_TOP], run.latencies_s[_BATCH]
    print(
        f"  {name:<16} top class: p50 {_ms(top, 0.5)} ms  p99 {_ms(top, 0.99)} ms  shed {run.shed[_TOP]:5d}"
        f"   |  class {_BATCH}: p99 {_ms(batch, 0.99)} ms  served {len(batch):5d}  shed {run.shed[_BATCH]:5d}"
    )


def bench_admission_main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and prints the figures; returns 0."""
    parser = argparse.ArgumentParser(prog="irmiddleware bench-admission", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500, help="requests per run (default 1500)")
    parser.add_argument("--rate", type=float, default=600.0, help="offered requests/s (default 600)")
    args = parser.parse_args(argv)
    if not 100 <= args.requests <= 20_000 or not 10 <= args.rate <= 10_000:
        parser.error("--requests must be in 100..20000 and --rate in 10..10000")
    backends = [local_url() for _ in range(2)]
    with contextlib.ExitStack() as stack:
        for url in backends:
            # Four sequences at a time, 5 ms a token (8 tokens): ~40 ms a request, easily overloaded.
            stack.enter_context(emulated_vllm(url, max_num_seqs=4, time_per_output_token_s=0.005))
        print(
            f"{args.requests} requests at {args.rate:g}/s (20% class {_TOP}, 80% class {_BATCH}); "
            "2 backends x capacity 4, ~40 ms per request; queue 200, max wait 2 s"
        )
        for name, classes in (("with classes", True), ("without classes", False)):
            _report(name, _one_run(backends, classes, args.requests, args.rate))
    return 0


def _one_run(backends: list[str], classes: bool, count: int, rate_per_s: float) -> _Run:
    router = local_url()
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as file:
        file.write(_config(backends, router.removeprefix("http://"), classes))
    try:
        serve = ["-m", "irmiddleware", "serve", "--config", file.name, "--log-level", "warning"]
        with serving(serve, router):
            return asyncio.run(_workload(router, count, rate_per_s))
    finally:
        os.unlink(file.name)
