"""NVIDIA Triton's HTTP/REST API (KServe v2 plus extensions; doc/protocols.md §2).

The model comes from the path (`/v2/models/{name}[/versions/{v}]/...`), so request bodies are never
parsed: JSON tensors and the binary-tensor extension (JSON header, then raw tensor bytes, with
`Inference-Header-Content-Length`) go through byte for byte, and so do `/generate_stream` events
(SSE without `[DONE]`). Server health (`/v2/health/live|ready`) and the repository index are
answered by the router from its fleet view; model readiness and metadata go to a backend serving
the model. Errors are `{"error": "..."}`; a full dynamic-batcher queue answers 503 "Exceeds maximum
queue size" (overload). Metrics live on a port of their own (8002 by default).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Sequence
from typing import Final

from irmiddleware.hooks import AdapterError, BackendAdapter, Endpoint, LoadSignals, metric_samples

__all__ = ["METRICS_PORT", "TritonAdapter"]

_MODEL_PATH: Final = re.compile(
    r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
    r"(?:/(?P<action>infer|generate|generate_stream|ready|config|stats))?$"
)
_GET: Final = frozenset({"GET"})
_POST: Final = frozenset({"POST"})
# One endpoint per action; the paths are templates (matched by `match`, never looked up as is).
_ACTIONS: Final = {
    None: Endpoint("/v2/models/{name}", _GET),
    "ready": Endpoint("/v2/models/{name}/ready", _GET),
    "config": Endpoint("/v2/models/{name}/config", _GET),
    "stats": Endpoint("/v2/models/{name}/stats", _GET),
    "infer": Endpoint("/v2/models/{name}/infer", _POST),
    "generate": Endpoint("/v2/models/{name}/generate", _POST),
    "generate_stream": Endpoint("/v2/models/{name}/generate_stream", _POST),
}
_PENDING: Final = "nv_inference_pending_request_count"
METRICS_PORT: Final = 8002
"""Triton's default `--metrics-port`; a backend's `metrics_url` overrides it."""


class TritonAdapter(BackendAdapter):
    """Triton: model from the path, bodies untouched, `{"error": ...}` errors."""

    type_name = "triton"
    health_path = "/v2/health/ready"
    models_path = "/v2/repository/index"
    models_method = "POST"
    overload_statuses = frozenset({503})
    endpoints = (
        Endpoint("/v2/health/live", _GET, kind="health"),
        Endpoint("/v2/health/ready", _GET, kind="health"),
        Endpoint("/v2/repository/index", _POST, kind="models"),
        *_ACTIONS.values(),
    )

    def match(self, method: str, path: str) -> Endpoint | None:
        found = _MODEL_PATH.match(path)
        if found is None:
            return None
        endpoint = _ACTIONS[found["action"]]
        return endpoint if method in endpoint.methods else None

    def model_of(self, endpoint: Endpoint, path: str, body: bytes) -> str:
        found = _MODEL_PATH.match(path)
        if found is None:
            raise AdapterError(400, f"no model in path {path!r}")
        return urllib.parse.unquote(found["name"])

    def error_body(self, status: int, message: str, param: str | None = None) -> bytes:
        return json.dumps({"error": message}).encode()

    def health_answer(self, ready: bool) -> tuple[int, bytes]:
        # KServe v2: 200 = true, 4xx = false, empty body either way.
        return (200, b"") if ready else (400, b"")

    def models_body(self, models: Sequence[str], created: int) -> bytes:
        return json.dumps([{"name": name, "state": "READY"} for name in models]).encode()

    def parse_models(self, body: bytes) -> list[str]:
        entries = json.loads(body)
        ready = [e["name"] for e in entries if isinstance(e, dict) and e.get("state", "READY") == "READY"]
        return list(dict.fromkeys(str(name) for name in ready))

    def metrics_url(self, base_url: str) -> str | None:
        parts = urllib.parse.urlsplit(base_url)
        host = parts.hostname or ""
        netloc = f"[{host}]:{METRICS_PORT}" if ":" in host else f"{host}:{METRICS_PORT}"
        return urllib.parse.urlunsplit((parts.scheme, netloc, "/metrics", "", ""))

    def load_signals(self, metrics_text: str) -> LoadSignals | None:
        pending = metric_samples(metrics_text, (_PENDING,)).get(_PENDING)
        if pending is None:
            return None
        # Per model and version; the server's queue is what all of them wait in.
        return LoadSignals(queue_depth=round(sum(pending)))
