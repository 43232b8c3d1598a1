"""`irmiddleware bench-proxy`: the proxy's overhead, measured against direct calls in one run.

An emulated vLLM backend (no generation delay) and the proxy (`irmiddleware serve`) run as two
child processes on 127.0.0.1. For non-streaming and streaming completions the same client sends
the same requests directly and through the proxy, first one at a time (latency p50/p99) and then
with concurrency (requests/s). The proxy's CPU time per request is read from /proc for the proxy
process alone. As a floor for that CPU figure, the same client also calls a bare uvicorn app that
answers a fixed body (what any Python ASGI server costs per request before proxying anything).
With `--workers 1,2`, `irmiddleware serve --workers N` is measured instead for each N, under the
`--peers` table's saturating native load (requests per second, and CPU per request of the
supervisor and its workers together). With `--peers`, the Rust
routers `sglang-router` and `vllm-router` (when importable: `pip install sglang-router vllm-router`)
and ours are measured side by side under a saturating load (`_peers`). Prints numbers; asserts
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass

import httpx

from irmiddleware._native import OWNERS_MAX
from irmiddleware.bench._harness import (
    cpu_seconds,
    emulated_vllm,
    local_url,
    port_of,
    quantile,
    serving,
)
from irmiddleware.bench._peers import (
    BARE_APP,
    add_peer_arguments,
    check_peer_arguments,
    compare_peers,
    compare_workers,
)

__all__ = ["bench_proxy_main"]


@dataclass
class _Phase:
    latencies_s: list[float]
    """Every sequential request's latency, all rounds."""
    rate_per_s: float
    """Median over the rounds."""
    cpu_s_per_request: list[float]
    """One figure per round (empty when the process's CPU is not measured)."""

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_s_per_request)

    @property
    def cpu_text(self) -> str:
        cpu = self.cpu_s_per_request
        if not cpu:
            return "n/a"
        text = f"{self.cpu_median * 1e6:6.0f} us/request"
        if len(cpu) > 1:
            text += f" (median of {len(cpu)} rounds, {min(cpu) * 1e6:.0f}-{max(cpu) * 1e6:.0f})"
        return text


def _body(stream: bool) -> dict[str, object]:
    return {"model": "m", "prompt": "Hello there", "max_tokens": 16, "ignore_eos": True, "stream": stream}


def _sequential(url: str, count: int, stream: bool) -> list[float]:
    latencies = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(count):
            started = time.perf_counter()
            with client.stream("POST", "/v1/completions", json=_body(stream)) as response:
                for _chunk in response.iter_raw():
                    pass
            latencies.append(time.perf_counter() - started)
    return latencies


async def _concurrent(url: str, count: int, concurrency: int, stream: bool) -> float:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        remaining = iter(range(count))

        async def worker() -> None:
            for _ in remaining:
                async with client.stream("POST", "/v1/completions", json=_body(stream)) as response:
                    async for _chunk in response.aiter_raw():
                        pass

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.perf_counter() - started)


def _phase(url: str, args: argparse.Namespace, stream: bool, pid: int | None) -> _Phase:
    _sequential(url, min(50, args.requests), stream)  # warm up connections and code paths
    latencies: list[float] = []
    rates: list[float] = []
    cpu: list[float] = []
    for _round in range(args.repeats):
        cpu_before = cpu_seconds(pid) if pid else 0.0
        latencies += _sequential(url, args.requests, stream)
        rates.append(asyncio.run(_concurrent(url, args.requests, args.concurrency, stream)))
        if pid:
            cpu.append((cpu_seconds(pid) - cpu_before) / (2 * args.requests))
    return _Phase(latencies, statistics.median(rates), cpu)


def _quantile_ms(values: list[float], q: float) -> float:
    return quantile(values, q) * 1000


def _report(name: str, direct: _Phase, proxied: _Phase) -> None:
    p50 = _quantile_ms(proxied.latencies_s, 0.5) - _quantile_ms(direct.latencies_s, 0.5)
    p99 = _quantile_ms(proxied.latencies_s, 0.99) - _quantile_ms(direct.latencies_s, 0.99)
    print(f"{name}:")
    for label, phase in (("direct ", direct), ("proxied", proxied)):
        p50_ms, p99_ms = _quantile_ms(phase.latencies_s, 0.5), _quantile_ms(phase.latencies_s, 0.99)
        print(f"  {label}: p50 {p50_ms:7.3f} ms  p99 {p99_ms:7.3f} ms  {phase.rate_per_s:8.0f} req/s")
    print(f"  added  : p50 {p50:+7.3f} ms  p99 {p99:+7.3f} ms   proxy CPU {proxied.cpu_text}")


def _worker_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    most = OWNERS_MAX - 1  # one owner index per worker
    if not counts or not all(1 <= count <= most for count in counts):
        raise argparse.ArgumentTypeError(f"--workers wants counts in 1..{most} like 1,2,4, got {text!r}")
    return counts


def bench_proxy_main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and prints the figures; returns 0."""
    parser = argparse.ArgumentParser(prog="irmiddleware bench-proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per phase (default 1000)")
    parser.add_argument("--concurrency", type=int, default=16, help="clients in the throughput phase")
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds per phase; CPU is reported as their median (default 1)"
    )
    parser.add_argument("--transport", choices=["lean", "httpx"], default="lean", help="the proxy's upstream")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also measure sglang-router and vllm-router (when installed) and ours, plain and cache-aware",
    )
    parser.add_argument(
        "--workers",
        type=_worker_counts,
        metavar="N,N,...",
        help="instead of the overhead phases: req/s and CPU per request of `serve --workers N` for each N"
        " (the --peers load; --seconds and --rounds apply)",
    )
    add_peer_arguments(parser)
    args = parser.parse_args(argv)
    check_peer_arguments(parser, args)
    if not 10 <= args.requests <= 100_000 or not 1 <= args.concurrency <= 1024 or not 1 <= args.repeats <= 20:
        parser.error("--requests must be in 10..100000, --concurrency in 1..1024 and --repeats in 1..20")
    backend, proxy, bare = local_url(), local_url(), local_url()
    serve = ["-m", "irmiddleware", "serve", "--backend", backend, "--model", "m", "--capacity", "4096"]
    serve += ["--log-level", "warning", "--transport", args.transport]
    # No generation delay: what is left of a request's time is HTTP and the proxy.
    instant = emulated_vllm(backend, max_num_seqs=1024, time_per_output_token_s=0.0)
    if args.workers:
        compare_workers(args, args.workers)
        return 0
    serve += ["--listen", proxy.removeprefix("http://")]
    with instant, serving(serve, proxy) as proxy_process:
        rounds = f", {args.repeats} rounds per phase" if args.repeats > 1 else ""
        print(
            f"{args.requests} requests per phase, concurrency {args.concurrency}, one emulated vLLM backend,"
            f" {args.transport} upstream transport{rounds}"
        )
        non_streaming_cpu = 0.0
        for name, stream in (("non-streaming", False), ("streaming (16 chunks)", True)):
            direct = _phase(backend, args, stream, None)
            proxied = _phase(proxy, args, stream, proxy_process.pid)
            _report(name, direct, proxied)
            if not stream:
                non_streaming_cpu = proxied.cpu_median
        if args.peers:
            compare_peers(args)
    with serving(["-c", BARE_APP, port_of(bare)], bare) as bare_process:
        floor = _phase(bare, args, False, bare_process.pid).cpu_median
    ratio = non_streaming_cpu / floor if floor else float("nan")
    print(
        f"floor: a bare uvicorn app answering a fixed body costs {floor * 1e6:.0f} us/request;"
        f" the non-streaming proxy is {ratio:.1f}x that"
    )
    return 0
