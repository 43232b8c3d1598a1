"""`irmiddleware demo` (the README's first command) runs end to end: a real emulated fleet, the
router, OpenAI-client traffic per strategy, a report line per strategy with every backend's
share, and a clean shutdown with all in-flight counters back at zero."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from irmiddleware._demo import Run, reading

pytestmark = pytest.mark.slow  # runs the demo: an emulated fleet, a router and a client for each strategy


def test_demo_reports_each_strategy_and_shuts_down() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "irmiddleware", "demo", "--requests", "40", "--concurrency", "8",
         "--strategy", "round_robin", "--strategy", "p2c"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for strategy in ("round_robin", "p2c"):
        line = next(line for line in result.stdout.splitlines() if line.startswith(strategy))
        assert "errors 0" in line, line
        shares = [int(share) for share in re.findall(r"(\d+)%", line)]
        assert len(shares) == 4
        assert 98 <= sum(shares) <= 102  # rounded percentages of all routed requests
    assert "returned to zero" in result.stdout
    reading = next(line for line in result.stdout.splitlines() if "had the shortest tail" in line)
    best, worst = re.findall(r"^(\w+) had the shortest tail .* and (\w+) the longest", reading)[0]
    assert {best, worst} == {"round_robin", "p2c"}


def test_the_reading_names_the_best_and_worst_tail_and_round_robins_slow_share() -> None:
    def run(strategy: str, latencies_s: list[float], slow_requests: int) -> Run:
        share = {"fast-a": 40, "fast-b": 40, "medium": 20 - slow_requests, "slow": slow_requests}
        return Run(strategy, latencies_s, 0, 1.0, share)

    runs = [run("round_robin", [0.1] * 8 + [0.9] * 2, 10), run("p2c", [0.1] * 10, 4)]
    first, second = reading(runs)
    assert first.startswith("p2c had the shortest tail (p90 100 ms) and round_robin the longest (900 ms)")
    assert "it sent slow 10% of the requests, p2c 4%" in second
    assert reading(runs[:1]) == []  # nothing to compare


def test_demo_refuses_bad_arguments() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "irmiddleware", "demo", "--requests", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
