"""Proves the cache-aware strategies in the simulator, on a seeded multi-turn chat workload with a
shared system prompt, heterogeneous accelerators and a prefix cache on each:

- prefix_affinity has the best p99 time to first token and the best cache hit rate of the five
  strategies, while no accelerator's utilisation exceeds the bounded-load limit (time-averaged, and
  at every admission within the +1 of the core's rule);
- the chat model itself: a turn's prompt extends the previous one, the LRU keeps the most recent
  blocks, prefill is charged for the uncached blocks only, and the run is repeatable.
"""

from __future__ import annotations

import random

import pytest

from irmiddleware.sim import (
    AFFINITY_STRATEGIES,
    ChatWorkload,
    PoissonArrivals,
    Scenario,
    StrategyResult,
    compare,
    make_fleet,
    session_rate,
    simulate,
)
from irmiddleware.sim._chat import Conversation
from irmiddleware.testing import PrefixCache


def _chat_scenario(sessions: int = 1_500, seed: int = 1) -> Scenario:
    fleet = make_fleet(8, heterogeneity=1.0, capacity=16, seed=seed)  # speeds 0.5-1.8, batches 8-29
    workload = ChatWorkload()
    return Scenario(fleet, workload, PoissonArrivals(session_rate(fleet, workload, 0.8)), sessions, seed=seed)


@pytest.fixture(scope="module")
def results() -> dict[str, StrategyResult]:
    return {result.strategy: result for result in compare(_chat_scenario())}


@pytest.mark.slow
def test_all_five_strategies_serve_every_request(results: dict[str, StrategyResult]) -> None:
    assert tuple(results) == AFFINITY_STRATEGIES
    for result in results.values():
        assert result.rejected == result.failed == 0
        assert result.completed == result.requests > 1_500  # several turns per session


@pytest.mark.slow
def test_prefix_affinity_has_the_best_ttft_tail_and_hit_rate(results: dict[str, StrategyResult]) -> None:
    best = results["prefix_affinity"]
    assert best.ttft is not None and best.cache_hit_rate is not None
    for name, other in results.items():
        if name == "prefix_affinity":
            continue
        assert other.ttft is not None and other.cache_hit_rate is not None
        assert best.ttft.p99 < other.ttft.p99, name
        assert best.cache_hit_rate > other.cache_hit_rate, name


@pytest.mark.slow
def test_prefix_affinity_stays_within_the_bound(results: dict[str, StrategyResult]) -> None:
    result = results["prefix_affinity"]
    assert max(result.utilisation) <= result.utilisation_bound
    assert result.bound_excess_max <= 1  # At admission: ⌈(1+ε) * fleet cost * share⌉ + 1.
    affinity = result.affinity
    assert affinity.decisions == result.requests
    assert affinity.hits > affinity.overloads > 0  # Affinity mostly kept, sometimes yielded to load.


@pytest.mark.slow
def test_strategies_without_affinity_report_no_affinity_outcomes(results: dict[str, StrategyResult]) -> None:
    assert results["p2c"].affinity.hits == 0
    assert results["consistent_hash"].affinity.hits > 0


def test_the_same_seed_gives_the_same_run() -> None:
    scenario = _chat_scenario(sessions=200, seed=4)
    assert simulate(scenario, "prefix_affinity") == simulate(scenario, "prefix_affinity")


def test_a_turn_extends_the_previous_prompt_and_shares_the_system_prompt() -> None:
    workload = ChatWorkload(system_tokens=64, block_tokens=16)
    rng = random.Random(3)
    first = Conversation(0, workload.session(rng), workload)
    second = Conversation(1, workload.session(rng), workload)
    turns = first.plan.turns
    earlier = first.blocks(turns[0].prompt_tokens, 16)
    assert first.blocks(turns[-1].prompt_tokens, 16)[: len(earlier)] == earlier
    assert first.blocks(64, 16) == second.blocks(64, 16)  # four system-prompt blocks, shared
    assert first.blocks(80, 16)[4] != second.blocks(80, 16)[4]  # the first block of each session


def test_prefix_cache_is_lru_and_reuses_a_prefix_only() -> None:
    cache = PrefixCache(capacity_blocks=3)
    cache.store([1, 2, 3])
    assert cache.cached_prefix([1, 2, 3, 4]) == 3
    cache.store([4])  # evicts 1, the least recently stored
    assert cache.cached_prefix([1, 2, 3]) == 0  # 2 and 3 are cached but not a prefix
    assert cache.cached_prefix([2, 3, 4]) == 3


def test_prefill_is_charged_for_uncached_tokens_only() -> None:
    workload = ChatWorkload(prefill_s_per_token=0.001)
    assert workload.job(1_000, 10, cached_tokens=0).prefill_s == pytest.approx(1.0)
    assert workload.job(1_000, 10, cached_tokens=992).prefill_s == pytest.approx(0.008)
    assert workload.job(1_000, 10, cached_tokens=1_000).prefill_s == pytest.approx(0.001)
