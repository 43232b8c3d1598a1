"""`irmiddleware bench` runs end to end and prints a rate for every strategy and mode (the
numbers themselves are a benchmark's business, not a test's)."""

from __future__ import annotations

import re
import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "irmiddleware", *args], capture_output=True, text=True, timeout=300
    )


def test_bench_prints_every_strategy_and_mode() -> None:
    result = run_cli("bench", "--accelerators", "200", "--requests", "10000", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^(round_robin|least_connections|p2c)\s+(.+?)\s+([\d,]+)\s", result.stdout, re.M)
    modes = {(strategy, mode.strip()) for strategy, mode, _rate in rows}
    for strategy in ("round_robin", "least_connections", "p2c"):
        for mode in ("route per call (seed API)", "route batched", "route+release batched"):
            assert (strategy, mode) in modes, result.stdout
    assert all(int(rate.replace(",", "")) > 0 for _s, _m, rate in rows)


def test_bench_refuses_bad_sizes() -> None:
    result = run_cli("bench", "--requests", "15")
    assert result.returncode == 2
    assert "multiple of" in result.stderr


def test_cli_lists_commands_and_refuses_unknown_ones() -> None:
    listed = run_cli("--help")
    assert listed.returncode == 0
    for command in ("demo", "serve", "simulate", "bench"):
        assert command in listed.stdout
    unknown = run_cli("frobnicate")
    assert unknown.returncode == 2
    assert "unknown command" in unknown.stderr


def test_bench_proxy_measures_direct_proxied_and_floor() -> None:
    """Starts an emulated backend, the proxy and a bare uvicorn app on 127.0.0.1 as processes."""
    result = run_cli("bench-proxy", "--requests", "20", "--concurrency", "2", "--repeats", "2")
    assert result.returncode == 0, result.stderr
    sections = re.findall(r"^(non-streaming|streaming \(16 chunks\)):$", result.stdout, re.M)
    assert sections == ["non-streaming", "streaming (16 chunks)"], result.stdout
    rates = re.findall(
        r"^  (direct |proxied): p50 +[\d.]+ ms  p99 +[\d.]+ ms +(\d+) req/s$", result.stdout, re.M
    )
    assert [label for label, _rate in rates] == ["direct ", "proxied"] * 2, result.stdout
    assert all(int(rate) > 0 for _label, rate in rates)
    cpu = r"proxy CPU +\d+ us/request \(median of 2 rounds, \d+-\d+\)$"
    assert len(re.findall(cpu, result.stdout, re.M)) == 2, result.stdout
    assert re.search(r"^floor: a bare uvicorn app .* costs \d+ us/request", result.stdout, re.M), (
        result.stdout
    )


def test_bench_proxy_refuses_bad_sizes() -> None:
    result = run_cli("bench-proxy", "--requests", "5")
    assert result.returncode == 2
    assert "--requests must be" in result.stderr
    assert run_cli("bench-proxy", "--repeats", "0").returncode == 2
