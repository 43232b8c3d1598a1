"""`irmiddleware demo` (the README's first command) runs end to end: a real emulated fleet, the
router, OpenAI-client traffic per strategy, a report line per strategy with every backend's
share, and a clean shutdown with all in-flight counters back at zero."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

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


def test_demo_refuses_bad_arguments() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "irmiddleware", "demo", "--requests", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
