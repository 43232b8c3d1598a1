"""Proves the discrete-event simulation through the native core:

- its service model gives the analytic answer on hand-made arrivals (continuous batching slows
  every request in a batch equally);
- P2C beats round robin on p99 latency on a heterogeneous fleet, and least connections balances
  utilisation best (seeded, so the comparison is exact, not statistical);
- a downed accelerator receives nothing while down (read from the core's own counters), whether its
  in-flight requests fail or finish;
- rejections happen when nothing fits, and retries with backoff turn some into completions;
- the same seed gives identical results, a different seed different ones;
- the core is idle after every run (each acquire released exactly once).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from irmiddleware.sim import (
    Arrival,
    Failure,
    Fleet,
    LlmWorkload,
    PoissonArrivals,
    ReplayArrivals,
    Scenario,
    StrategyResult,
    UniformWorkload,
    compare,
    make_fleet,
    offered_rate,
    simulate,
)

# prefill 0.001 s/token and decode 0.01 s/token: 100 prompt tokens = 0.1 s, 100 output = 1 s.
EXACT_WORKLOAD = LlmWorkload(prefill_s_per_token=0.001, decode_s_per_token=0.01)


def _llm_scenario(seed: int = 3, requests: int = 6_000, **changes: Any) -> Scenario:
    fleet = make_fleet(40, heterogeneity=1.0, seed=seed)
    workload = LlmWorkload()
    arrivals = PoissonArrivals(offered_rate(fleet, workload, 0.8))
    return dataclasses.replace(Scenario(fleet, workload, arrivals, requests=requests, seed=seed), **changes)


def _replay(fleet: Fleet, *arrivals: Arrival) -> Scenario:
    return Scenario(fleet, EXACT_WORKLOAD, ReplayArrivals(arrivals), requests=len(arrivals))


def test_one_request_alone_takes_its_work_over_speed() -> None:
    fleet = Fleet(speeds=(2.0,), capacities=(4,), batch_slowdown=0.5)
    result = simulate(_replay(fleet, Arrival(0.0, 100, 100)), "p2c")
    assert result.completed == 1
    assert result.latency is not None and result.ttft is not None
    assert math.isclose(result.latency.max, 1.1 / 2)
    assert math.isclose(result.ttft.max, 0.1 / 2)


def test_batching_slows_every_request_in_the_batch() -> None:
    # From t=0.55 both run at 1/(1+0.5) = 2/3: the first (0.55 s of work left) ends at 1.375;
    # the second has 0.55 done by then and runs alone for its last 0.55 s, ending at 1.925.
    fleet = Fleet(speeds=(1.0,), capacities=(4,), batch_slowdown=0.5)
    result = simulate(_replay(fleet, Arrival(0.0, 100, 100), Arrival(0.55, 100, 100)), "round_robin")
    assert list(result.latencies_s) == pytest.approx([1.375, 1.925 - 0.55])
    assert result.duration_s == pytest.approx(1.925)


def test_a_full_fleet_rejects_and_retries_can_rescue() -> None:
    fleet = Fleet(speeds=(1.0,), capacities=(1,))
    arrivals = (Arrival(0.0, 100, 100), Arrival(0.5, 100, 100))
    rejected = simulate(_replay(fleet, *arrivals), "p2c")
    assert (rejected.completed, rejected.rejected) == (1, 1)
    scenario = Scenario(fleet, EXACT_WORKLOAD, ReplayArrivals(arrivals), requests=2, retries=4, backoff_s=0.2)
    retried = simulate(scenario, "p2c")
    # Retries at 0.7, 1.1 (free from 1.1 on): the second request's latency includes its backoff.
    assert (retried.completed, retried.rejected, retried.retries) == (2, 0, 2)
    assert retried.latencies_s[-1] == pytest.approx(1.1 + 1.1 - 0.5)


@pytest.fixture(scope="module")
def heterogeneous() -> list[StrategyResult]:
    return compare(_llm_scenario())


def test_p2c_beats_round_robin_on_p99_latency(heterogeneous: list[StrategyResult]) -> None:
    by_name = {result.strategy: result for result in heterogeneous}
    assert [result.strategy for result in heterogeneous] == ["round_robin", "least_connections", "p2c"]
    p2c, round_robin = by_name["p2c"].latency, by_name["round_robin"].latency
    assert p2c is not None and round_robin is not None
    assert p2c.p99 < round_robin.p99
    assert by_name["p2c"].utilisation_cv < by_name["round_robin"].utilisation_cv
    assert by_name["least_connections"].utilisation_cv < by_name["p2c"].utilisation_cv


def test_every_request_is_accounted_for(heterogeneous: list[StrategyResult]) -> None:
    for result in heterogeneous:
        assert result.completed + result.rejected + result.failed == result.requests == 6_000
        assert len(result.latencies_s) == len(result.ttfts_s) == result.completed


@pytest.mark.parametrize("on_failure", ["fail", "finish"])
def test_a_downed_accelerator_receives_nothing_while_down(on_failure: str) -> None:
    failures = (Failure(0, 5.0, 40.0), Failure(7, 10.0, None), Failure(0, 60.0, 70.0))
    scenario = _llm_scenario(requests=4_000, failures=failures, on_failure=on_failure)
    for result in compare(scenario):
        assert [outage.routed_while_down for outage in result.outages] == [0, 0, 0], result.strategy
        assert [(o.accelerator, o.down_s) for o in result.outages] == [(0, 5.0), (7, 10.0), (0, 60.0)]
        assert (result.failed > 0) == (on_failure == "fail"), result.strategy


def test_same_seed_same_results_and_another_seed_differs() -> None:
    first = compare(_llm_scenario(seed=11, requests=2_000))
    assert first == compare(_llm_scenario(seed=11, requests=2_000))
    assert first != compare(_llm_scenario(seed=12, requests=2_000))


def test_uniform_workload_has_no_time_to_first_token() -> None:
    fleet = make_fleet(10, heterogeneity=0.5, seed=1)
    workload = UniformWorkload()
    scenario = Scenario(fleet, workload, PoissonArrivals(offered_rate(fleet, workload, 0.5)), requests=500)
    result = simulate(scenario, "least_connections")
    assert result.ttft is None and result.completed == 500 and result.output_tokens == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"requests": 0}, "requests"),
        ({"retries": -1}, "retries"),
        ({"on_failure": "explode"}, "on_failure"),
        ({"failures": (Failure(99, 1.0, 2.0),)}, "accelerator 99"),
        ({"failures": (Failure(1, 1.0, 5.0), Failure(1, 4.0, 6.0))}, "overlap"),
    ],
)
def test_bad_scenarios_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _llm_scenario(**changes)


def test_an_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        simulate(_llm_scenario(requests=10), "random")
