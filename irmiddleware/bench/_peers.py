"""`irmiddleware bench-proxy --peers`: ours beside the Rust routers, each driven to saturation.

Four canned vLLM-shaped backends and a native load generator (both `loadgen.c`, see `_load`; the
generator keeps 64 keep-alive connections busy) share one set of CPUs; the router under test has
the other CPU to itself (pinned before it starts, so every thread it makes is).
Each router is started in front of the same four
backends with its plain strategy (ours `p2c`, theirs `round_robin`) and its cache-aware one (ours
`prefix_affinity`, theirs `cache_aware`), and loaded with chat completions for a bounded time and
count, non-streaming then streaming (16 events). Its CPU per request is the CPU time of its
process tree (from /proc) over the responses the generator read whole. A bare uvicorn app
answering a fixed body, on the same CPU under the same load, is the floor any Python ASGI server
starts from. Every router is measured once per round, the rounds one after the other, and each
figure is the median over the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field

from irmiddleware.bench._harness import (
    format_table,
    local_url,
    port_of,
    process_tree,
    serving,
    tree_cpu_seconds,
)
from irmiddleware.bench._load import LoadResult, http_request, loadgen_binary, run_load

__all__ = ["BARE_APP", "add_peer_arguments", "check_peer_arguments", "compare_peers", "compare_workers"]

# Router -> (module that must be importable, its (strategy, kind) pairs).
_ROUTERS = {
    "irmiddleware": ("irmiddleware", (("p2c", "plain"), ("prefix_affinity", "cache-aware"))),
    "sglang-router": ("sglang_router", (("round_robin", "plain"), ("cache_aware", "cache-aware"))),
    "vllm-router": ("vllm_router", (("round_robin", "plain"), ("cache_aware", "cache-aware"))),
}
_BACKENDS = 4
_CONNECTIONS = 64
# `serving` starts Python; the canned backend replaces it (same process, so `serving` can stop it).
_EXEC = "import os, sys; os.execv(sys.argv[1], sys.argv[1:])"

# The floor: uvicorn (with the same loop and parser as `irmiddleware serve`) answering a fixed body.
BARE_APP = """
import sys, uvicorn
BODY = b'{"id":"cmpl-0","object":"text_completion","choices":[{"index":0,"text":"hello"}]}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the `--peers` table."""
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="--peers: seconds per load run (default 5)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="--peers: rounds, figures are medians (default 2)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="--peers: pace the load at this many requests/s in all (default 0: as fast as answered)",
    )


def check_peer_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits through `parser.error` for --seconds, --rounds or --rate out of range (every run
    bounded)."""
    if not 0.2 <= args.seconds <= 120 or not 1 <= args.rounds <= 9 or not 0 <= args.rate <= 1_000_000:
        parser.error("--seconds must be in 0.2..120, --rounds in 1..9 and --rate in 0..1000000")


def _request(stream: bool) -> bytes:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Hello there, how are you doing today?"}],
        "max_tokens": 16,
        "stream": stream,
    }
    return http_request("/v1/chat/completions", json.dumps(body).encode())


def _router_command(router: str, strategy: str, backends: list[str], url: str) -> list[str]:
    """How to start `router` with `strategy` in front of `backends`, listening on `url`."""
    host, port = "127.0.0.1", port_of(url)
    if router == "irmiddleware":
        each = [arg for backend in backends for arg in ("--backend", backend)]
        return ["-m", "irmiddleware", "serve", *each, "--model", "m", "--capacity", "4096",
                "--strategy", strategy, "--listen", f"{host}:{port}", "--log-level", "warning"]  # fmt: skip
    # Both peers share the sglang command line (vllm-router is its fork); their log levels differ.
    level = "warn" if router == "sglang-router" else "warning"
    return ["-m", f"{_ROUTERS[router][0]}.launch_router", "--host", host, "--port", port, "--worker-urls",
            *backends, "--policy", strategy, "--log-level", level]  # fmt: skip


@dataclass
class _Row:
    """One router and strategy: per round, (req/s, CPU s per response) non-streaming and streaming."""

    plain: list[tuple[float, float]] = field(default_factory=list)
    streamed: list[tuple[float, float]] = field(default_factory=list)


def _measure(
    url: str, pid: int, stream: bool, args: argparse.Namespace, load_cpus: set[int]
) -> tuple[float, float]:
    request = _request(stream)
    warm_up_s = min(1.0, args.seconds)  # connections opened, code paths and caches warm
    load = {"connections": _CONNECTIONS, "rate": args.rate, "cpus": load_cpus}
    run_load(url, request, seconds=warm_up_s, max_requests=100_000, **load)
    pids = process_tree(pid)
    before = tree_cpu_seconds(pids)
    result: LoadResult = run_load(url, request, seconds=args.seconds, max_requests=2_000_000, **load)
    cpu = tree_cpu_seconds(pids) - before
    if result.non_2xx or result.errors:
        print(f"  ({url}: {result.non_2xx} answers not 2xx, {result.errors} connection errors)")
    return result.rate_per_s, cpu / max(result.responses, 1)


@contextlib.contextmanager
def _backends(cpus: set[int]) -> Iterator[list[str]]:
    urls = [local_url() for _ in range(_BACKENDS)]
    binary = str(loadgen_binary())
    with contextlib.ExitStack() as stack:
        for url in urls:
            stack.enter_context(serving(["-c", _EXEC, binary, "serve", port_of(url)], url, cpus))
        yield urls


def _cpus() -> tuple[set[int], set[int]]:
    """(the router's CPU, the load's CPUs): the last CPU this process may use, and the others."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return set(allowed), set(allowed)
    return {allowed[-1]}, set(allowed[:-1])


def _median(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def _rounds(args: argparse.Namespace, routers: list[str]) -> dict[str, _Row]:
    router_cpus, load_cpus = _cpus()
    rows: dict[str, _Row] = {}
    with _backends(load_cpus) as backends:
        for _round in range(args.rounds):
            for router in routers:
                for strategy, kind in _ROUTERS[router][1]:
                    url = local_url()
                    command = _router_command(router, strategy, backends, url)
                    row = rows.setdefault(f"{router}, {strategy} ({kind})", _Row())
                    with serving(command, url, router_cpus) as process:
                        row.plain.append(_measure(url, process.pid, False, args, load_cpus))
                        row.streamed.append(_measure(url, process.pid, True, args, load_cpus))
            url = local_url()
            with serving(["-c", BARE_APP, port_of(url)], url, router_cpus) as process:
                rows.setdefault("floor: bare uvicorn, fixed body", _Row()).plain.append(
                    _measure(url, process.pid, False, args, load_cpus)
                )
    return rows


_COLUMNS = ("req/s", "CPU µs/req", "stream req/s", "stream CPU µs/req")


def _cells(name: str, row: _Row) -> tuple[str, ...]:
    """A table row: `name`, then the medians of `_COLUMNS` (blank where nothing streamed)."""
    rate, cpu = _median(row.plain)
    cells = [name, f"{rate:,.0f}", f"{cpu * 1e6:,.0f}"]
    if row.streamed:
        stream_rate, stream_cpu = _median(row.streamed)
        cells += [f"{stream_rate:,.0f}", f"{stream_cpu * 1e6:,.0f}"]
    else:
        cells += ["", ""]
    return tuple(cells)


def _ratio_lines(rows: dict[str, _Row]) -> list[str]:
    """Ours against the better peer (least CPU per request), plain and cache-aware."""
    lines = []
    for kind, ours in (
        ("plain", "irmiddleware, p2c (plain)"),
        ("cache-aware", "irmiddleware, prefix_affinity (cache-aware)"),
    ):
        peers = [row for name, row in rows.items() if name.endswith(f"({kind})") and name != ours]
        if ours not in rows or not peers:
            continue
        for label, pick in (("non-streaming", "plain"), ("streaming", "streamed")):
            mine = _median(getattr(rows[ours], pick))[1]
            best = min(_median(getattr(row, pick))[1] for row in peers)
            lines.append(
                f"{kind}, {label}: ours {mine * 1e6:,.0f} µs/req, best peer {best * 1e6:,.0f}:"
                f" {mine / best:.2f}x"
            )
    return lines


def compare_peers(args: argparse.Namespace) -> None:
    """Prints the table of routers side by side (module docstring)."""
    routers = [name for name, (module, _) in _ROUTERS.items() if importlib.util.find_spec(module)]
    for name in _ROUTERS.keys() - set(routers):
        print(f"{name}: not installed (pip install {name}), left out")
    router_cpus, load_cpus = _cpus()
    print(
        f"\nRouters side by side: router on CPU {sorted(router_cpus)}, {_BACKENDS} canned backends and"
        f" the load generator ({_CONNECTIONS} keep-alive connections, {args.seconds:g} s a run,"
        f" {f'paced at {args.rate:g} requests/s' if args.rate else 'saturating'}) on"
        f" {sorted(load_cpus)}; medians of {args.rounds} rounds; CPU is each router's process tree's"
        " own, per response"
    )
    rows = _rounds(args, routers)
    print(format_table(("router, strategy", *_COLUMNS), [_cells(name, row) for name, row in rows.items()]))
    for line in _ratio_lines(rows):
        print(line)


def compare_workers(args: argparse.Namespace, counts: list[int]) -> None:
    """`serve --workers N` for each N in `counts` under the same saturating load as the peers'
    table: req/s and CPU per response of the supervisor and its workers together, non-streaming
    and streaming. The load generator and the backends keep their CPUs; the router may use every
    CPU (on a machine of two, its workers share one with the load: say so beside the figures)."""
    _, load_cpus = _cpus()
    everything = set(os.sched_getaffinity(0))
    print(
        f"\nWorkers on one table: `serve --workers N` (p2c) on CPUs {sorted(everything)}, {_BACKENDS}"
        f" canned backends and the load generator ({_CONNECTIONS} keep-alive connections,"
        f" {args.seconds:g} s a run, saturating) on {sorted(load_cpus)}; medians of {args.rounds}"
        " rounds; CPU is the supervisor's and its workers' together, per response"
    )
    rows: dict[str, _Row] = {}
    with _backends(load_cpus) as backends:
        for _round in range(args.rounds):
            for count in counts:
                url = local_url()
                command = [*_router_command("irmiddleware", "p2c", backends, url), "--workers", str(count)]
                row = rows.setdefault(str(count), _Row())
                with serving(command, url, everything) as process:
                    row.plain.append(_measure(url, process.pid, False, args, load_cpus))
                    row.streamed.append(_measure(url, process.pid, True, args, load_cpus))
    print(format_table(("workers", *_COLUMNS), [_cells(count, row) for count, row in rows.items()]))
