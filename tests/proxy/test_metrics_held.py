"""The router's latency histograms hold their per-request observations between collections and
hand them over in bulk: every export shows every observation made before it, in the same buckets,
count and sum as prometheus-client's own `observe` puts them (bucket bounds included), and a
backend that leaves the fleet leaves nothing held behind."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from irmiddleware.proxy._metrics import _BUCKETS_S, RouterMetrics

# On, just above and just below bucket bounds, zero, and past the last bound.
VALUES = (0.0, 0.001, 0.005, 0.0050001, 0.0999, 0.1, 0.7, 2.5, 600.0, 1000.0)


def _lines(page: bytes, name: str) -> list[str]:
    return [line for line in page.decode().splitlines() if line.startswith(name) and "_created" not in line]


def test_held_observations_export_as_prometheus_observe_would() -> None:
    metrics = RouterMetrics(lambda: [])
    baseline = CollectorRegistry()
    plain = Histogram(
        "irm_upstream_latency_seconds", "x", ["backend"], buckets=_BUCKETS_S, registry=baseline
    ).labels("http://b")
    held = metrics.of("http://b").latency
    for round_ in range(2):  # a second round adds to what the first export handed over
        for value in VALUES:
            held.observe(value)
            plain.observe(value)
        exported = _lines(metrics.exposition(), "irm_upstream_latency_seconds")
        assert exported == _lines(generate_latest(baseline), "irm_upstream_latency_seconds"), round_
        assert (
            f'irm_upstream_latency_seconds_count{{backend="http://b"}} {len(VALUES) * (round_ + 1)}.0'
            in exported
        )


def test_any_collection_of_the_registry_sees_held_observations() -> None:
    metrics = RouterMetrics(lambda: [])
    metrics.of("http://b").ttfb.observe(0.02)
    value = metrics.registry.get_sample_value("irm_upstream_ttfb_seconds_count", {"backend": "http://b"})
    assert value == 1.0


def test_a_forgotten_backend_leaves_nothing_held() -> None:
    metrics = RouterMetrics(lambda: [])
    stale = metrics.of("http://gone").latency
    stale.observe(0.02)
    metrics.forget("http://gone")
    assert b"http://gone" not in metrics.exposition()
    stale.observe(0.02)  # an attempt that was under way when its backend left
    metrics.of("http://kept").latency.observe(0.02)
    page = metrics.exposition()
    assert b"http://gone" not in page and b"http://kept" in page
