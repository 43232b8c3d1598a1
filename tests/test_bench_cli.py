"""The benchmark commands (`irmiddleware bench`, `bench-proxy`, `bench-affinity`,
`bench-admission`) run end to end and print every figure they promise (the numbers themselves are
a benchmark's business, not a test's), and their shared harness computes percentiles and tables
as documented."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from irmiddleware.bench._harness import format_table, quantile

pytestmark = pytest.mark.slow  # runs the benchmark commands, which start routers and emulators as processes


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
        for mode in ("route+release per call (Lease)", "route+release per call (slots)"):
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


def test_bench_affinity_reports_each_part() -> None:
    result = run_cli("bench-affinity", "--sessions", "20", "--accelerators", "8")
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^(.+?: .+?)\s+([\d.]+)\s+([\d.]+)$", result.stdout, re.M)
    assert [name.strip() for name, _median, _p99 in rows] == [
        "prefix_affinity: hashing",
        "prefix_affinity: decision + release",
        "prefix_affinity: hash + decide + release",
        "least_ttft: decision + release",
        "least_ttft: hash + decide + release",
        "consistent_hash: decision + release",
        "p2c (baseline): decision + release",
    ], result.stdout
    assert all(float(median) <= float(p99) for _name, median, p99 in rows)


def test_bench_admission_runs_with_and_without_classes() -> None:
    """Starts two emulated backends and, per run, the router on 127.0.0.1 as processes."""
    result = run_cli("bench-admission", "--requests", "100", "--rate", "200")
    assert result.returncode == 0, result.stderr
    runs = re.findall(r"^  (with classes|without classes) +top class: p50 +[\d.]+ ms", result.stdout, re.M)
    assert runs == ["with classes", "without classes"], result.stdout


def test_quantile_interpolates_between_ranks() -> None:
    values = [float(value) for value in range(1, 101)]
    assert quantile(values, 0.5) == 50.5
    assert quantile(values, 0.99) == 99.01
    assert quantile(list(reversed(values)), 0.9) == quantile(values, 0.9)
    assert quantile([7.0], 0.99) == 7.0
    assert math.isnan(quantile([], 0.5))


def test_format_table_aligns_names_left_and_figures_right() -> None:
    table = format_table(["name", "mode", "rate"], [["a", "slow one", "1"], ["bb", "x", "1,000"]], left=2)
    assert table.splitlines() == [
        "name  mode       rate",
        "a     slow one      1",
        "bb    x         1,000",
    ]
