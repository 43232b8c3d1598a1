"""The simulated replica study (`simulate --replicas`): R real routers with their own books and
delayed engine signals. A seed replays exactly; every turn is either completed or rejected and
every replica's core ends idle; what replicas cost each strategy goes the way the study documents
(per-replica prefix indexes lose cache hits as replicas multiply, queue_aware balances better
than p2c once there are several replicas); the command prints its table and refuses bad values."""

from __future__ import annotations

import subprocess
import sys

import pytest

from irmiddleware.sim import (
    ChatWorkload,
    LlmWorkload,
    PoissonArrivals,
    ReplicaScenario,
    Scenario,
    make_fleet,
    replica_study,
    session_rate,
    simulate_replicas,
)


def _scenario(sessions: int = 300, seed: int = 3) -> Scenario:
    fleet = make_fleet(8, heterogeneity=1.0, capacity=8, seed=seed)
    workload = ChatWorkload(think_s=2.0)
    arrivals = PoissonArrivals(session_rate(fleet, workload, 0.8))
    return Scenario(fleet, workload, arrivals, requests=sessions, seed=seed)


@pytest.mark.slow  # three simulations of a few seconds each on a shared machine
def test_a_seed_replays_and_every_turn_is_accounted_for() -> None:
    study = ReplicaScenario(_scenario(sessions=120), replicas=3)
    first = simulate_replicas(study, "queue_aware")
    assert simulate_replicas(study, "queue_aware") == first
    assert first.completed + first.rejected == first.requests > 120
    assert first.imbalance >= 1.0
    assert first.affinity_hit_rate is None
    assert simulate_replicas(study, "consistent_hash").affinity_hit_rate is not None


@pytest.mark.slow  # four simulations
def test_replicas_cost_prefix_affinity_its_cache_and_p2c_its_balance() -> None:
    scenario = _scenario(sessions=200)
    (one,) = replica_study(scenario, [1], ["prefix_affinity"])
    eight = {r.strategy: r for r in replica_study(scenario, [8], ["prefix_affinity", "queue_aware", "p2c"])}
    assert eight["prefix_affinity"].cache_hit_rate < one.cache_hit_rate
    assert eight["queue_aware"].imbalance < eight["p2c"].imbalance


def test_the_study_refuses_what_it_cannot_model() -> None:
    with pytest.raises(ValueError, match="chat workload"):
        plain = _scenario()
        ReplicaScenario(Scenario(plain.fleet, LlmWorkload(), plain.arrivals, requests=10), replicas=2)
    for bad in ({"replicas": 0}, {"replicas": 2, "skew": 0.5}, {"replicas": 2, "signal_interval_s": 0}):
        with pytest.raises(ValueError):
            ReplicaScenario(_scenario(), **bad)  # type: ignore[arg-type]


@pytest.mark.slow  # runs the command in a child process
def test_simulate_replicas_prints_a_row_per_count_and_strategy() -> None:
    command = [sys.executable, "-m", "irmiddleware", "simulate", "--replicas", "1,2"]
    small = ["--accelerators", "4", "--capacity", "4", "--sessions", "60"]
    result = subprocess.run([*command, *small], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split()[:2] for line in result.stdout.splitlines() if line[:1] in ("1", "2")]
    strategies = ["p2c", "queue_aware", "consistent_hash", "prefix_affinity"]
    assert rows == [[count, name] for count in ("1", "2") for name in strategies], result.stdout
    refused = subprocess.run([*command[:-1], "0", *small], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert "replicas must be in 1..64" in refused.stderr
