"""Proves the statistics: nearest-rank percentiles, rates that count every request, load
imbalance (max/mean and coefficient of variation), the utilisation histogram, and that the tables
show every strategy."""

from __future__ import annotations

from array import array

import pytest

from irmiddleware.sim import Percentiles, StrategyResult, format_histograms, format_table


def _result(name: str, utilisation: tuple[float, ...], ttft: bool = True) -> StrategyResult:
    latencies = array("d", [float(value) for value in range(1, 101)])
    return StrategyResult(
        strategy=name,
        requests=110,
        completed=100,
        rejected=8,
        failed=2,
        retries=0,
        duration_s=50.0,
        arrivals_end_s=40.0,
        completed_by_arrivals_end=80,
        output_tokens=1_000,
        latency=Percentiles.of(latencies),
        ttft=Percentiles.of(latencies) if ttft else None,
        utilisation=utilisation,
        latencies_s=latencies,
    )


def test_nearest_rank_percentiles() -> None:
    assert Percentiles.of(list(range(1, 101))) == Percentiles(50, 90, 99, 100)
    assert Percentiles.of([7.0]) == Percentiles(7.0, 7.0, 7.0, 7.0)
    assert Percentiles.of([]) is None


def test_rates_and_imbalance() -> None:
    result = _result("p2c", (0.2, 0.4, 0.6))
    assert result.throughput_rps == 2.0 and result.tokens_per_s == 20.0
    assert result.rejection_rate == pytest.approx(8 / 110) and result.failure_rate == pytest.approx(2 / 110)
    assert result.imbalance == pytest.approx(1.5)
    assert result.utilisation_cv == pytest.approx((0.08 / 3) ** 0.5 / 0.4)
    assert result.utilisation_histogram() == [0, 0, 1, 0, 1, 0, 1, 0, 0, 0]
    assert _result("idle", (0.0, 0.0)).imbalance == 1.0


def test_histogram_puts_full_accelerators_in_the_top_bucket() -> None:
    assert _result("full", (1.0, 0.999, 0.0)).utilisation_histogram(4) == [1, 0, 0, 2]


def test_tables_show_every_strategy() -> None:
    results = [_result("round_robin", (0.5,)), _result("p2c", (0.5,))]
    table = format_table(results)
    assert "ttft p99" in table and "round_robin" in table and "p2c" in table
    assert "ttft" not in format_table([_result("x", (0.5,), ttft=False)])
    assert format_histograms(results).splitlines()[0].split()[-1] == "90%"
