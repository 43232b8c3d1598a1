"""`irmiddleware bench-proxy --peers` prints one row per router and strategy: ours (p2c and
prefix_affinity) always, and sglang-router and vllm-router when they are installed; a peer that is
not installed is named as left out, never silently skipped; and `--workers 1,2` prints one row
per worker count under the same native load."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # starts an emulated backend and several routers as processes


def test_peers_are_measured_or_named_as_missing() -> None:
    command = [
        "bench-proxy",
        "--requests",
        "10",
        "--concurrency",
        "2",
        "--peers",
        "--seconds",
        "0.5",
        "--rounds",
        "1",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "irmiddleware", *command], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = dict(re.findall(r"^(\S+, \S+ \([a-z-]+\))\s+(.+)$", result.stdout, re.M))
    assert {"irmiddleware, p2c (plain)", "irmiddleware, prefix_affinity (cache-aware)"} <= set(rows)
    for router, module in (("sglang-router", "sglang_router"), ("vllm-router", "vllm_router")):
        measured = [row for row in rows if row.startswith(router + ",")]
        if importlib.util.find_spec(module) is None:
            assert f"{router}: not installed" in result.stdout and not measured
        else:
            assert len(measured) == 2, result.stdout
    for figures in rows.values():
        numbers = [float(n.replace(",", "")) for n in figures.split()]
        # req/s, CPU µs/req, stream req/s, stream CPU µs/req. CPU comes from /proc in clock ticks
        # (10 ms): a Rust router serving 10 requests may use less than one, so 0 is a valid CPU.
        assert len(numbers) == 4 and numbers[0] > 0 and numbers[2] > 0, figures
        assert all(n >= 0 for n in numbers), figures


def test_workers_rows_under_the_native_load() -> None:
    command = ["bench-proxy", "--workers", "1,2", "--seconds", "0.5", "--rounds", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "irmiddleware", *command], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = dict(re.findall(r"^([12])\s+(.+)$", result.stdout, re.M))
    assert sorted(rows) == ["1", "2"], result.stdout
    for figures in rows.values():
        numbers = [float(n.replace(",", "")) for n in figures.split()]
        # req/s, CPU µs/req, stream req/s, stream CPU µs/req: every run served something.
        assert len(numbers) == 4 and numbers[0] > 0 and numbers[2] > 0, figures
