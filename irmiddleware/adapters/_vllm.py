"""vLLM's OpenAI-compatible server (doc/protocols.md §1).

vLLM speaks the OpenAI paths (`/v1/completions`, `/v1/chat/completions`, `/v1/embeddings`,
`/v1/models`), names the model in the JSON body's `model` field and answers errors as
`{"error": {"message", "type", "param", "code"}}` (since 0.10.1). What differs from a generic
OpenAI server is its health endpoint (`GET /health`: 200 when the engine is alive, 503 when dead),
its Prometheus metrics on the API port (`/metrics`), and its overload answer: 503 once a bounded
queue (`--max-num-queued-reqs`) is full (a rival proposal answers 429; both count as overload).
"""

from __future__ import annotations

from typing import Final

from irmiddleware.adapters._openai import OpenAIAdapter
from irmiddleware.hooks import LoadSignals, metric_samples

__all__ = ["VLLMAdapter"]

_WAITING: Final = "vllm:num_requests_waiting"
_RUNNING: Final = "vllm:num_requests_running"
_KV: Final = "vllm:kv_cache_usage_perc"
_KV_OLD: Final = "vllm:gpu_cache_usage_perc"  # before 0.10; removed in 0.12


class VLLMAdapter(OpenAIAdapter):
    """vLLM: OpenAI paths and errors, `/health` for health, `/v1/models` for discovery."""

    type_name = "vllm"
    health_path = "/health"
    overload_statuses = frozenset({429, 503})

    def metrics_url(self, base_url: str) -> str | None:
        return base_url + "/metrics"

    def load_signals(self, metrics_text: str) -> LoadSignals | None:
        samples = metric_samples(metrics_text, (_WAITING, _RUNNING, _KV, _KV_OLD))
        if _WAITING not in samples:
            return None
        # One sample per data-parallel engine: queues add up; the fullest KV cache is the limit.
        kv = samples.get(_KV) or samples.get(_KV_OLD) or [0.0]
        running = samples.get(_RUNNING)
        return LoadSignals(
            queue_depth=round(sum(samples[_WAITING])),
            kv_usage=max(kv),
            running=round(sum(running)) if running else None,
        )
