"""`irmiddleware bench-signals`: what reading a backend's load from its Prometheus page costs.

The router scrapes every backend's `/metrics` once per `signals.interval_s` and reads three or
four gauges from it (vLLM: requests waiting and running, KV-cache use). A real vLLM page is
mostly histograms the router never reads (several hundred lines with the process collectors), so
the page here is built the same way: vLLM's metric families with vLLM's label names and bucket
edges, filled with observations, plus prometheus-client's process and platform collectors,
rendered by prometheus-client. Each round times the adapter's `load_signals` (which keeps only the
lines it needs, then parses them with prometheus-client's parser) against a parse of the whole
page with the same parser, measured in the same run. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from irmiddleware.adapters import VLLMAdapter
from irmiddleware.bench._harness import format_table, quantile

_LABELS = ("model_name", "engine")
# Bucket edges of vLLM's latency histograms (seconds) and token-count histograms.
_SECONDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
_HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": _SECONDS,
    "vllm:inter_token_latency_seconds": _SECONDS,
    "vllm:e2e_request_latency_seconds": _SECONDS,
    "vllm:request_queue_time_seconds": _SECONDS,
    "vllm:request_inference_time_seconds": _SECONDS,
    "vllm:request_prefill_time_seconds": _SECONDS,
    "vllm:request_decode_time_seconds": _SECONDS,
    "vllm:request_prompt_tokens": _TOKENS,
    "vllm:request_generation_tokens": _TOKENS,
    "vllm:request_params_max_tokens": _TOKENS,
    "vllm:iteration_tokens_total": _TOKENS,
}
_COUNTERS = ("vllm:prompt_tokens", "vllm:generation_tokens", "vllm:num_preemptions",
             "vllm:prefix_cache_queries", "vllm:prefix_cache_hits")  # fmt: skip
_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


def vllm_page(engines: int = 2, seed: int = 1) -> str:
    """A vLLM-shaped `/metrics` page: its families, labels and buckets, `engines` data-parallel
    engines, every series observed, rendered by prometheus-client."""
    rng = random.Random(seed)
    registry = CollectorRegistry()
    registry.register(PROCESS_COLLECTOR)
    registry.register(PLATFORM_COLLECTOR)
    histograms = [Histogram(n, n, _LABELS, buckets=b, registry=registry) for n, b in _HISTOGRAMS.items()]
    counters = [Counter(name, name, _LABELS, registry=registry) for name in _COUNTERS]
    gauges = [Gauge(name, name, _LABELS, registry=registry) for name in _GAUGES]
    success = Counter("vllm:request_success", "finished", (*_LABELS, "finished_reason"), registry=registry)
    for engine in map(str, range(engines)):
        for histogram in histograms:
            for _ in range(20):
                histogram.labels("m", engine).observe(rng.expovariate(1.0) * 10)
        for counter in counters:
            counter.labels("m", engine).inc(rng.randrange(1, 1000))
        for gauge in gauges:  # queue lengths, and KV-cache use as a fraction
            gauge.labels("m", engine).set(rng.random() if gauge is gauges[-1] else rng.randrange(16))
        for reason in ("stop", "length", "abort"):
            success.labels("m", engine, reason).inc(rng.randrange(1, 100))
    return generate_latest(registry).decode()


def _whole_page(text: str) -> object:
    # The baseline: every family parsed, as the router did before it kept only the lines it needs.
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def _times_us(operation: Callable[[], object], rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter_ns()
        operation()
        times.append((time.perf_counter_ns() - started) / 1000)
    return times


def bench_signals_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="irmiddleware bench-signals", description=__doc__)
    parser.add_argument("--rounds", type=int, default=200, help="parses timed per way (default 200)")
    parser.add_argument("--engines", type=int, default=2, help="data-parallel engines on the page (2)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.engines < 1:
        parser.error("--rounds and --engines must be positive")
    text = vllm_page(args.engines)
    adapter = VLLMAdapter()
    signals = adapter.load_signals(text)
    lines = len(text.splitlines())
    print(f"a vLLM-shaped page of {lines} lines ({len(text):,} bytes), {args.engines} engines: {signals}")
    whole = _times_us(lambda: _whole_page(text), args.rounds)
    needed = _times_us(lambda: adapter.load_signals(text), args.rounds)
    ways = (("the whole page parsed (baseline)", whole), ("load_signals: needed lines only", needed))
    rows = [(name, f"{quantile(t, 0.5):,.0f}", f"{quantile(t, 0.99):,.0f}") for name, t in ways]
    print(format_table(("way", "median µs", "p99 µs"), rows))
    print(f"ratio: {quantile(whole, 0.5) / quantile(needed, 0.5):.0f}x less per scrape")
    return 0
