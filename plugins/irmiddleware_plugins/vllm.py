"""Built-in adapter for vLLM's OpenAI-compatible server (protocols.md §1).

vLLM speaks the OpenAI paths (`/v1/completions`, `/v1/chat/completions`, `/v1/embeddings`,
`/v1/models`), names the model in the JSON body's `model` field and answers errors as
`{"error": {"message", "type", "param", "code"}}` (since 0.10.1). What differs from a generic
OpenAI server is its health endpoint: `GET /health`, 200 when the engine is alive, 503 when dead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from irmiddleware.hooks import BackendAdapter, hookimpl

__all__ = ["VLLMAdapter", "irm_adapters"]


class VLLMAdapter(BackendAdapter):
    """vLLM: OpenAI paths and errors, `/health` for health, `/v1/models` for discovery."""

    type_name = "vllm"
    health_path = "/health"


@hookimpl
def irm_adapters() -> Mapping[str, Callable[[], BackendAdapter]]:
    return {"vllm": VLLMAdapter}
