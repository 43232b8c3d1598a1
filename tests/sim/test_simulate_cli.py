"""Proves `irmiddleware simulate`: small runs print a table with all three strategies, the same
seed prints the same numbers, the balls-into-bins mode prints its bounds, `--plot` writes a PNG
(or says clearly that matplotlib is missing), and bad input exits 2 with a message."""

from __future__ import annotations

from pathlib import Path

import pytest

from irmiddleware.sim import _cli
from irmiddleware.sim._cli import simulate_main

SMALL = ["--accelerators", "12", "--requests", "1500", "--seed", "5"]


def _rows(output: str) -> dict[str, list[str]]:
    """Table rows by strategy name."""
    names = ("round_robin", "least_connections", "p2c")
    return {
        cells[0]: cells[1:] for cells in map(str.split, output.splitlines()) if cells and cells[0] in names
    }


def _numbers(output: str) -> str:
    return output.split("(simulated in")[0]  # Everything but the wall-clock line.


def test_prints_all_three_strategies_and_repeats_itself(capsys: pytest.CaptureFixture[str]) -> None:
    assert simulate_main(SMALL) == 0
    first = capsys.readouterr().out
    assert list(_rows(first)) == ["round_robin", "least_connections", "p2c"]
    assert "p99 s" in first and "ttft p99" in first
    assert simulate_main(SMALL) == 0
    assert _numbers(capsys.readouterr().out) == _numbers(first)


def test_failures_retries_and_histogram(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        *SMALL,
        "--workload",
        "uniform",
        "--arrival",
        "bursty",
        "--fail",
        "2:1:3",
        "--retries",
        "2",
        "--histogram",
    ]
    assert simulate_main(argv) == 0
    out = capsys.readouterr().out
    assert "utilisation from" in out
    assert out.count("routed to it meanwhile: 0") == 3


def test_trace_arrivals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("time,prompt_tokens,output_tokens\n" + "".join(f"{i / 10},100,50\n" for i in range(200)))
    assert simulate_main(["--accelerators", "4", "--arrival", "trace", "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "200 llm requests, trace arrivals" in out  # The trace ends before --requests' default.
    # Each strategy completed all 200 (a light load: nothing rejected).
    assert [cells[0] for cells in _rows(out).values()] == ["200"] * 3


def test_balls_into_bins(capsys: pytest.CaptureFixture[str]) -> None:
    assert simulate_main(["--balls-into-bins", "--bins", "100", "1000"]) == 0
    out = capsys.readouterr().out
    assert "ln ln n/ln 2" in out and "1,000" in out


@pytest.mark.slow  # imports matplotlib and renders a figure
def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "cmp.png"
    assert simulate_main([*SMALL, "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(_cli, "_matplotlib_available", lambda: False)
    assert simulate_main([*SMALL, "--plot", str(tmp_path / "x.png")]) == 2
    assert "pip install 'irmiddleware[plot]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arrival", "trace"], "needs --trace"),
        (["--arrival", "trace", "--trace", "/nonexistent.csv"], "no trace file"),
        (["--fail", "1:5:2"], "failure"),
        (["--strategies", "p2c,random"], "unknown strategy"),
    ],
)
def test_bad_input_exits_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert simulate_main([*SMALL, *argv]) == 2
    assert message in capsys.readouterr().err


def test_progress_bar_only_when_asked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IRM_PROGRESS", "1")
    # The simulation reports progress every 10,000 requests: the fewest that draw the bar.
    assert simulate_main([*SMALL, "--requests", "10000", "--strategies", "p2c"]) == 0
    assert "p2c [" in capsys.readouterr().err
    monkeypatch.setenv("IRM_PROGRESS", "0")
    assert simulate_main([*SMALL, "--strategies", "p2c"]) == 0
    assert capsys.readouterr().err == ""


def test_chat_workload_compares_all_five_strategies(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--workload", "chat", "--accelerators", "4", "--sessions", "60", "--turns", "2:4", "--seed", "2"]
    assert simulate_main(argv) == 0
    output = capsys.readouterr().out
    names = ("round_robin", "least_connections", "p2c", "consistent_hash", "prefix_affinity")
    rows = [line.split()[0] for line in output.splitlines() if line.split() and line.split()[0] in names]
    assert rows == list(names)
    assert "hit%" in output and "bound" in output and "in 60 sessions" in output
    assert simulate_main([*argv, "--turns", "3"]) == 2
    assert "--turns expects MIN:MAX" in capsys.readouterr().err
