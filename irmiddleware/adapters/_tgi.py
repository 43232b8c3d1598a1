"""Hugging Face Text Generation Inference (doc/protocols.md §3).

TGI serves one model per server, and its native requests (`/generate`, `/generate_stream`, the
`/` compat route) do not name it; its chat `model` field is "tgi" (or absent) for the base model,
huggingface_hub's placeholder "dummy", or a LoRA adapter's name. So a backend's model is its
`/info` `model_id` (or the configured names), a request naming one of them goes to its backends,
and a request naming none (no model, "tgi", "dummy") goes to the one model the TGI backends serve.
Any other name is unknown to the router (404), as it is to every other protocol: TGI itself would
fall back to the base model silently, which in a mixed fleet would hide a typo behind a 200.
Bodies and streams (`data:` events without `[DONE]`) go through untouched. Errors are
`{"error": ..., "error_type": ...}`; a full server answers 429 `overloaded`, except on streaming
routes, where it takes its permit inside the stream and so reports overload as the first event of
a 200 answer (doc/protocols.md §3.4): `data:{"error":"Model is overloaded","error_type":"overloaded"}` on
`/generate_stream`, `data:{"error":{"message":"Model is overloaded","http_status_code":422}}` on
streaming chat. `stream_overloaded` recognizes both, so the router retries those elsewhere too.
"""

from __future__ import annotations

import json
from typing import Final

from irmiddleware._json import loads_body
from irmiddleware.adapters._openai import OpenAIAdapter
from irmiddleware.hooks import Endpoint, LoadSignals, metric_samples

__all__ = ["TGIAdapter"]

_GET: Final = frozenset({"GET"})
_POST: Final = frozenset({"POST"})
_OPENAI_PATHS: Final = frozenset({"/v1/chat/completions", "/v1/completions"})
# Names meaning "the server's model" rather than naming one: TGI's own ("tgi", its Messages API
# documentation's example) and huggingface_hub's placeholder when the model is given as a URL.
_BASE_MODEL_NAMES: Final = frozenset({"", "tgi", "dummy"})
_ERROR_TYPES: Final = {
    400: "validation",
    404: "not_found",
    413: "validation",
    422: "validation",
    429: "overloaded",
    502: "unavailable",
    503: "unavailable",
    504: "timeout",
}
_OVERLOADED: Final = "Model is overloaded"
_QUEUE: Final = "tgi_queue_size"
_BATCH: Final = "tgi_batch_current_size"


class TGIAdapter(OpenAIAdapter):
    """TGI: one model per server, `/info` for discovery, `/health` for health. Its OpenAI routes
    keep the OpenAI adapter's model list and affinity reading; its errors are TGI's own."""

    type_name = "tgi"
    health_path = "/health"
    models_path = "/info"
    overload_statuses = frozenset({429})
    overload_in_stream = True
    single_model = True
    endpoints = (
        Endpoint("/health", _GET, kind="health"),
        Endpoint("/info", _GET),
        Endpoint("/generate", _POST),
        Endpoint("/generate_stream", _POST),
        Endpoint("/", _POST),
        Endpoint("/v1/chat/completions", _POST),
        Endpoint("/v1/completions", _POST),
        Endpoint("/v1/models", _GET, kind="models"),
    )

    def model_of(self, endpoint: Endpoint, path: str, body: bytes) -> str:
        # Only the OpenAI routes carry a model; a body the router cannot read is the backend's to
        # reject (422), so nothing here raises.
        if path not in _OPENAI_PATHS:
            return ""
        try:
            parsed = loads_body(body)
        except (ValueError, UnicodeDecodeError):
            return ""
        model = parsed.get("model") if isinstance(parsed, dict) else None
        return model if isinstance(model, str) and model not in _BASE_MODEL_NAMES else ""

    def error_body(self, status: int, message: str, param: str | None = None) -> bytes:
        return json.dumps({"error": message, "error_type": _ERROR_TYPES.get(status, "router")}).encode()

    def stream_overloaded(self, first_event: bytes) -> bool:
        line = first_event.lstrip().partition(b"\n")[0].rstrip(b"\r")
        if not line.startswith(b"data:"):
            return False
        try:
            payload = json.loads(line[5:])
        except (ValueError, UnicodeDecodeError):
            return False
        if not isinstance(payload, dict):
            return False
        if payload.get("error_type") == "overloaded":  # /generate_stream
            return True
        # Streaming chat: no error type, only the message (and a 422 that is not one).
        error = payload.get("error")
        return isinstance(error, dict) and error.get("message") == _OVERLOADED

    def health_answer(self, ready: bool) -> tuple[int, bytes]:
        if ready:
            return 200, b""
        return 503, json.dumps({"error": "unhealthy", "error_type": "healthcheck"}).encode()

    def parse_models(self, body: bytes) -> list[str]:
        model_id = json.loads(body).get("model_id")
        return [model_id] if isinstance(model_id, str) and model_id else []

    def metrics_url(self, base_url: str) -> str | None:
        return base_url + "/metrics"

    def load_signals(self, metrics_text: str) -> LoadSignals | None:
        samples = metric_samples(metrics_text, (_QUEUE, _BATCH))
        if _QUEUE not in samples:
            return None
        batch = samples.get(_BATCH)
        return LoadSignals(
            queue_depth=round(sum(samples[_QUEUE])), running=round(sum(batch)) if batch else None
        )
