"""Pins the public surface of `irmiddleware.sim`: a change to `__all__` must be deliberate, and the
examples in the module docstring and in doc/simulation.md run."""

from __future__ import annotations

from pathlib import Path

import pytest

import irmiddleware.sim


def test_public_names_are_pinned_and_sorted() -> None:
    names = irmiddleware.sim.__all__
    assert names == sorted(names, key=lambda name: (not name.isupper(), name[0].islower(), name))
    assert set(names) == {
        "AFFINITY_STRATEGIES", "DEFAULT_STRATEGIES", "Affinity", "Arrival", "ArrivalProcess", "BallsIntoBins",
        "BurstyArrivals", "ChatWorkload", "Failure",
        "Fleet", "Job", "LlmWorkload", "Outage", "Percentiles", "PoissonArrivals", "Progress",
        "ReplayArrivals", "Scenario", "SpeedChange", "StrategyResult", "TraceArrivals",
        "UniformWorkload", "Workload",
        "balls_into_bins", "compare", "format_balls_into_bins", "format_histograms", "format_table",
        "make_fleet", "max_load_one_choice", "max_load_two_choices", "mean_work_s", "offered_rate",
        "session_rate", "simulate",
        # the replica study
        "REPLICA_STRATEGIES", "ReplicaResult", "ReplicaScenario", "format_replica_table", "replica_study",
        "simulate_replicas",
    }  # fmt: skip
    for name in names:
        assert hasattr(irmiddleware.sim, name), name


def test_docstring_example_runs() -> None:
    doc = irmiddleware.sim.__doc__
    assert doc is not None
    example = doc.split("\n\n")[2].replace("20_000", "500")
    exec(compile("\n".join(line[4:] for line in example.splitlines()), "<sim docstring>", "exec"), {})


def test_simulation_doc_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    doc = Path(__file__).parents[2] / "doc" / "simulation.md"
    if not doc.exists():
        pytest.skip("doc/ is not shipped with this installation")
    example = doc.read_text().split("```python\n")[1].split("```")[0]
    exec(compile(example.replace("20_000", "500"), str(doc), "exec"), {})
    assert "least_connections" in capsys.readouterr().out
