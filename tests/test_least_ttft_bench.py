"""`irmiddleware bench-predict` runs end to end on a tiny plan: emulated vLLM servers of unequal
speed and a router as processes on 127.0.0.1, the openai client driving chats through it with
each strategy; it prints the steady-speed table (every measured answer came back, the warm-up's
not counted) and the share table of the slowdown phase, and writes the plot. The figures themselves are the
benchmark's business, not the test's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts emulators and routers as processes


def test_bench_predict_prints_both_phases(tmp_path: Path) -> None:
    args = ["--sessions", "4", "--turns", "2", "--users", "2", "--think", "0.01", "--warmup", "2"]
    args += ["--slow-at", "0.5", "--slow-for", "0.5", "--window", "0.5", "--decode-s", "0.01"]
    args += ["--plot", str(tmp_path / "predict.png")]
    result = subprocess.run(
        [sys.executable, "-m", "irmiddleware", "bench-predict", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^(prefix_affinity|least_ttft) +(\d+) +(\d+) ", result.stdout, re.M)
    assert rows[:2] == [("prefix_affinity", "8", "0"), ("least_ttft", "8", "0")], result.stdout
    assert "phase 1: steady speeds" in result.stdout
    assert "phase 2: backend 0 twice as slow" in result.stdout
    assert re.search(r"^t, s +prefix_affinity +least_ttft$", result.stdout, re.M), result.stdout
    assert (tmp_path / "predict.png").stat().st_size > 0


@pytest.mark.parametrize("bad", [["--sessions", "0"], ["--warmup", "-1"]])
def test_bench_predict_refuses_bad_sizes(bad: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "irmiddleware", "bench-predict", *bad],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and f"{bad[0]} must be in" in result.stderr
