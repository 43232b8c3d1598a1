"""`irmiddleware demo`: a small heterogeneous fleet of emulated vLLM servers on 127.0.0.1, the
router in front of them, and a short burst of real OpenAI-client traffic through it for each
strategy; prints each backend's share of requests and the latency percentiles, then shuts
everything down. No configuration; under a minute."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from irmiddleware.bench._harness import quantile

MODEL = "demo-llama"
TOKENS = 24


@dataclass(frozen=True)
class Server:
    """One emulated accelerator: how fast it decodes and how many requests it batches."""

    name: str
    seconds_per_token: float
    batch: int


FLEET = (
    Server("fast-a", 0.004, 8),
    Server("fast-b", 0.004, 8),
    Server("medium", 0.008, 4),
    Server("slow", 0.020, 4),
)


@dataclass
class Run:
    strategy: str
    latencies_s: list[float]
    errors: int
    wall_s: float
    share: dict[str, int]


def _missing_extra() -> str | None:
    try:
        import openai  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        return f"irmiddleware demo needs the demo extra: pip install 'irmiddleware[demo]' ({error})"
    return None


@contextlib.contextmanager
def _fleet(fleet: Sequence[Server]) -> Iterator[list[str]]:
    from irmiddleware.testing import VLLMConfig, create_vllm_app, serve_in_thread

    with contextlib.ExitStack() as stack:
        urls = []
        for index, server in enumerate(fleet):
            config = VLLMConfig(
                served_model_names=(MODEL,),
                max_num_seqs=server.batch,
                time_per_request_s=0.002,
                time_per_prompt_token_s=0.0,
                time_per_output_token_s=server.seconds_per_token,
                output_tokens_range=(TOKENS, TOKENS),
                seed=index,
            )
            urls.append(stack.enter_context(serve_in_thread(create_vllm_app(config))).url)
        yield urls


def _router_config(strategy: str, fleet: Sequence[Server], urls: Sequence[str]) -> Any:
    from irmiddleware.proxy import parse_config

    backends = [
        # Twice the batch: a backend may queue a little, as real servers do, so a poor choice shows.
        {"url": url, "type": "vllm", "capacity": 2 * server.batch, "models": [MODEL]}
        for server, url in zip(fleet, urls, strict=True)
    ]
    return parse_config({"router": {"strategy": strategy}, "backends": backends})


async def _burst(base_url: str, requests: int, concurrency: int) -> tuple[list[float], int]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="demo", max_retries=0, timeout=30)
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors = 0

    async def one(index: int) -> None:
        nonlocal errors
        async with gate:
            started = time.perf_counter()
            try:
                await client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"Request {index}: say something."}],
                    max_tokens=TOKENS,
                )
                latencies.append(time.perf_counter() - started)
            except openai.OpenAIError:
                errors += 1

    try:
        await asyncio.gather(*(one(index) for index in range(requests)))
    finally:
        await client.close()
    return latencies, errors


def run_strategy(strategy: str, urls: Sequence[str], requests: int, concurrency: int) -> Run:
    from irmiddleware.proxy import create_app
    from irmiddleware.testing import assert_idle, serve_in_thread

    app = create_app(_router_config(strategy, FLEET, urls))
    try:
        with serve_in_thread(app, lifespan=True) as router_server:
            started = time.perf_counter()
            latencies, errors = asyncio.run(_burst(router_server.url, requests, concurrency))
            wall_s = time.perf_counter() - started
        assert_idle(app.router)  # every request released its load, whatever happened to it
        names = {index: server.name for index, server in enumerate(FLEET)}
        share = {names[stats.id]: stats.routed for stats in app.router.stats()}
    finally:
        app.close()
    return Run(strategy, latencies, errors, wall_s, share)


def _share(run: Run, name: str) -> str:
    return f"{100 * run.share[name] / (sum(run.share.values()) or 1):.0f}%"


def reading(runs: Sequence[Run]) -> list[str]:
    """Two or three sentences that read the table: who did best on the tail and why, and why
    round robin's shares are what they are. The 90th percentile ranks the strategies: at a few
    hundred requests it is steadier from run to run than the 99th."""
    p90 = {run.strategy: quantile(run.latencies_s, 0.9) for run in runs if run.latencies_s}
    if len(p90) < 2:
        return []
    best, worst = min(p90, key=p90.__getitem__), max(p90, key=p90.__getitem__)
    slow, fast = FLEET[-1], FLEET[0]
    ratio = slow.seconds_per_token / fast.seconds_per_token
    lines = [
        f"{best} had the shortest tail (p90 {1000 * p90[best]:.0f} ms) and {worst} the longest "
        f"({1000 * p90[worst]:.0f} ms): a request that lands on {slow.name} takes {ratio:.0f}x as long "
        f"as on {fast.name}, so the tail is set by how much goes there while it is busy."
    ]
    by_name = {run.strategy: run for run in runs}
    if "round_robin" in by_name and best != "round_robin":
        capacities = ", ".join(str(2 * server.batch) for server in FLEET)
        lines.append(
            f"round_robin's shares are unequal only because it skips a backend that is full "
            f"(capacities {capacities}): it sent {slow.name} {_share(by_name['round_robin'], slow.name)} "
            f"of the requests, {best} {_share(by_name[best], slow.name)}, because {best} weighs what "
            f"each backend has in flight against its capacity."
        )
    return lines


def print_run(run: Run) -> None:
    total = sum(run.share.values()) or 1
    shares = "  ".join(f"{name} {100 * count / total:4.0f}%" for name, count in run.share.items())
    latency_ms = {q: 1000 * quantile(run.latencies_s, q) for q in (0.5, 0.9, 0.99)}
    print(
        f"{run.strategy:<18} {len(run.latencies_s) / run.wall_s:7.0f} req/s  "
        f"p50 {latency_ms[0.5]:5.0f} ms  p90 {latency_ms[0.9]:5.0f} ms  p99 {latency_ms[0.99]:5.0f} ms  "
        f"errors {run.errors}   share: {shares}"
    )


def demo_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="irmiddleware demo", description=__doc__)
    parser.add_argument("--requests", type=int, default=300, help="per strategy (default 300)")
    parser.add_argument("--concurrency", type=int, default=32, help="client requests in flight")
    parser.add_argument(
        "--strategy", action="append", help="default: round_robin, least_connections, p2c, queue_aware"
    )
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be positive")
    problem = _missing_extra()
    if problem:
        print(problem)
        return 2
    strategies = args.strategy or ["round_robin", "least_connections", "p2c", "queue_aware"]
    fleet_text = ", ".join(
        f"{s.name} ({1000 * s.seconds_per_token:.0f} ms/token, batch {s.batch})" for s in FLEET
    )
    print(f"fleet on 127.0.0.1: {fleet_text}")
    print(f"{args.requests} chat completions of {TOKENS} tokens per strategy, {args.concurrency} in flight\n")
    runs = []
    with _fleet(FLEET) as urls:
        for strategy in strategies:
            runs.append(run_strategy(strategy, urls, args.requests, args.concurrency))
            print_run(runs[-1])
    print()
    for line in reading(runs):
        print(line)
    print("All in-flight counters returned to zero after every run; fleet and routers shut down.")
    return 0
