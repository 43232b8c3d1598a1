"""Proves the simulator's models draw what they document: fleet speeds and capacities within the
heterogeneity bounds, heavy-tailed but clipped token counts, bursty arrivals with the promised mean
rate, trace files (CSV and JSONL) read in order with bad rows named by line, and failure specs."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from irmiddleware.sim import (
    Arrival,
    BurstyArrivals,
    Failure,
    Fleet,
    LlmWorkload,
    PoissonArrivals,
    ReplayArrivals,
    TraceArrivals,
    UniformWorkload,
    make_fleet,
    mean_work_s,
    offered_rate,
)


def test_fleet_speeds_stay_within_the_heterogeneity_band() -> None:
    fleet = make_fleet(500, heterogeneity=1.0, capacity=32, seed=4)
    assert 1 / 2 <= min(fleet.speeds) < 0.6 and 1.9 < max(fleet.speeds) <= 2
    assert all(
        cap == max(1, round(32 * speed)) for speed, cap in zip(fleet.speeds, fleet.capacities, strict=True)
    )
    assert make_fleet(500, heterogeneity=1.0, seed=4) == make_fleet(500, heterogeneity=1.0, seed=4)


def test_homogeneous_fleet_and_uniform_capacity() -> None:
    fleet = make_fleet(5, heterogeneity=0.0, capacity=8, capacity_follows_speed=False)
    assert fleet.speeds == (1.0,) * 5 and fleet.capacities == (8,) * 5
    assert fleet.peak_throughput() == pytest.approx(5 * 8 / (1 + 0.05 * 7))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"speeds": (), "capacities": ()},
        {"speeds": (1.0,), "capacities": (0,)},
        {"speeds": (-1.0,), "capacities": (1,)},
    ],
)
def test_bad_fleets_are_refused(kwargs: dict[str, tuple[float, ...]]) -> None:
    with pytest.raises(ValueError):
        Fleet(**kwargs)  # type: ignore[arg-type]


def test_llm_lengths_are_heavy_tailed_and_clipped() -> None:
    workload = LlmWorkload()
    rng = random.Random(0)
    jobs = [workload.draw(rng, None, None) for _ in range(20_000)]
    outputs = sorted(job.output_tokens for job in jobs)
    assert outputs[0] >= 1 and outputs[-1] <= workload.output_max
    assert outputs[-200] > 5 * outputs[len(outputs) // 2]  # p99 far above the median: a heavy tail
    assert all(job.prefill_s == job.prompt_tokens * workload.prefill_s_per_token for job in jobs[:100])
    given = workload.draw(rng, 10, 20)
    assert (given.prompt_tokens, given.output_tokens) == (10, 20)
    assert given.decode_s == 20 * workload.decode_s_per_token


def test_offered_rate_scales_with_load() -> None:
    fleet = make_fleet(10, seed=1)
    workload = UniformWorkload(mean_s=2.0)
    assert mean_work_s(workload) == pytest.approx(2.0, rel=0.01)
    assert offered_rate(fleet, workload, 0.5) == pytest.approx(fleet.peak_throughput() / 4, rel=0.01)
    with pytest.raises(ValueError):
        offered_rate(fleet, workload, 0)


@pytest.mark.parametrize("process", [PoissonArrivals(50.0), BurstyArrivals(50.0, period_s=2.0)])
def test_arrivals_keep_their_mean_rate(process: PoissonArrivals | BurstyArrivals) -> None:
    times = [arrival.time_s for arrival in itertools.islice(process.arrivals(random.Random(1)), 100_000)]
    assert times == sorted(times)
    assert len(times) / times[-1] == pytest.approx(50.0, rel=0.05)


def test_bursts_are_burstier_than_poisson() -> None:
    def busiest_second(process: PoissonArrivals | BurstyArrivals) -> int:
        counts: dict[int, int] = {}
        for arrival in itertools.islice(process.arrivals(random.Random(2)), 50_000):
            counts[int(arrival.time_s)] = counts.get(int(arrival.time_s), 0) + 1
        return max(counts.values())

    assert busiest_second(BurstyArrivals(50.0)) > 2 * busiest_second(PoissonArrivals(50.0))


def test_csv_and_jsonl_traces(tmp_path: Path) -> None:
    csv_path = tmp_path / "trace.csv"
    csv_path.write_text("time,prompt_tokens,output_tokens\n100.5,10,20\n101,,30\n102.5,5,\n")
    jsonl_path = tmp_path / "trace.jsonl"
    rows = [{"time": 100.5, "prompt_tokens": 10, "output_tokens": 20}, {"time": 101, "output_tokens": 30}]
    jsonl_path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    expected = [Arrival(0.0, 10, 20), Arrival(0.5, None, 30)]
    assert list(TraceArrivals(csv_path).arrivals(random.Random())) == [*expected, Arrival(2.0, 5, None)]
    assert list(TraceArrivals(jsonl_path).arrivals(random.Random())) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("time\n2\n1\n", "trace.csv:3: time goes backwards"), ("time\nsoon\n", "trace.csv:2: bad row")],
)
def test_bad_traces_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        list(TraceArrivals(path).arrivals(random.Random()))


def test_replay_refuses_time_going_backwards() -> None:
    with pytest.raises(ValueError, match="backwards"):
        list(ReplayArrivals((Arrival(1.0), Arrival(0.5))).arrivals(random.Random()))


def test_failure_specs() -> None:
    assert Failure.parse("3:10:25") == Failure(3, 10.0, 25.0)
    assert Failure.parse("0:1.5") == Failure(0, 1.5, None)
    for bad in ("3", "1:5:2", "x:1:2"):
        with pytest.raises(ValueError):
            Failure.parse(bad)
