"""least_ttft in the simulator, on a seeded chat workload over a heterogeneous fleet (speeds 1, 1,
0.7, 0.5): its p99 time to first token is at least 20 % lower than prefix_affinity's in the same
run, with a prefix-cache hit rate no worse and no accelerator ever above its bounded load; when an
accelerator slows 2x mid-run its share of admissions falls in the first 10 simulated seconds and
stays down while it is slow, and comes back once it recovers. A `SpeedChange` parses and checks
its values, and the CLI prints the share table. Simulated time only: no wall clock is asserted."""

from __future__ import annotations

import pytest

from irmiddleware.sim import Scenario, SpeedChange, compare
from irmiddleware.sim._chat import ChatWorkload, session_rate
from irmiddleware.sim._cli import simulate_main
from irmiddleware.sim._model import Fleet, PoissonArrivals
from irmiddleware.sim._shares import phase_shares, shares_over_time

SPEEDS = (1.0, 1.0, 0.7, 0.5)


def scenario(sessions: int, seed: int, *changes: SpeedChange) -> Scenario:
    fleet = Fleet(SPEEDS, tuple(max(1, round(32 * speed)) for speed in SPEEDS))
    workload = ChatWorkload()
    return Scenario(
        fleet=fleet,
        workload=workload,
        arrivals=PoissonArrivals(session_rate(fleet, workload, 0.8)),
        requests=sessions,
        seed=seed,
        speed_changes=changes,
    )


def test_a_speed_change_parses_and_checks_its_values() -> None:
    assert SpeedChange.parse("2:60:120") == SpeedChange(2, 60.0, 120.0, 2.0)
    assert SpeedChange.parse("1:5::3") == SpeedChange(1, 5.0, None, 3.0)
    for bad in ("1", "1:5:4", "1:5:9:0", "1:-1"):
        with pytest.raises(ValueError):
            SpeedChange.parse(bad)
    with pytest.raises(ValueError, match="speed change names accelerator 9"):
        scenario(10, 1, SpeedChange(9, 1.0))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_least_ttft_beats_prefix_affinity_and_moves_share_off_a_slowed_accelerator(seed: int) -> None:
    affine, ttft = compare(
        scenario(300, seed, SpeedChange(0, 100.0, 200.0)), ["prefix_affinity", "least_ttft"]
    )
    assert affine.ttft is not None and ttft.ttft is not None
    assert ttft.ttft.p99 <= 0.8 * affine.ttft.p99, (ttft.ttft.p99, affine.ttft.p99)
    assert ttft.cache_hit_rate is not None and affine.cache_hit_rate is not None
    assert ttft.cache_hit_rate >= affine.cache_hit_rate
    assert ttft.bound_excess_max == 0 and affine.bound_excess_max == 0
    assert ttft.completed == affine.completed == ttft.requests
    before, first, slow, recovered, after = (
        share for _name, share, _count in phase_shares(ttft, 0, 100, 200)
    )
    assert first < 0.75 * before and slow < 0.75 * before
    assert recovered > 1.5 * slow and after > 1.5 * slow


def test_the_cli_prints_the_share_table(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--workload", "chat", "--speeds", "1,1,0.7,0.5", "--sessions", "40", "--slow", "0:20:40"]
    argv += ["--strategies", "prefix_affinity,least_ttft", "--shares", "10", "--seed", "3"]
    assert simulate_main(argv) == 0
    printed = capsys.readouterr().out
    assert "share of admissions over time, windows of 10 s" in printed
    assert "share of admissions around the slowdown" in printed
    assert "least_ttft" in printed and "first 10 s slow" in printed


def test_shares_over_time_count_every_admission() -> None:
    (result,) = compare(scenario(30, 1), ["least_ttft"])
    assert len(result.routed_s) == len(result.routed_to) == result.completed
    windows = shares_over_time(result, 0, 50.0)
    assert windows and all(0.0 <= share <= 1.0 for _start, share in windows)
    with pytest.raises(ValueError):
        shares_over_time(result, 0, 0.0)
