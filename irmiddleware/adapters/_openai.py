"""The OpenAI-compatible protocol (doc/protocols.md §1): the `/v1` paths, the model in the JSON
body's `model` field, `{"error": {"message", "type", "param", "code"}}` errors, the model list as
`{"object": "list", "data": [...]}`. Any OpenAI-compatible server (SGLang, llama.cpp, LiteLLM, ...)
is served by `OpenAIAdapter` as is; vLLM and TGI build on it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Final

from irmiddleware._json import loads_body
from irmiddleware.hooks import AdapterError, BackendAdapter, Endpoint

__all__ = ["OpenAIAdapter", "prompt_text"]

_ERROR_TYPES: Final = {
    400: "BadRequestError",
    404: "NotFoundError",
    413: "RequestTooLargeError",
    429: "TooManyRequestsError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}
_GET: Final = frozenset({"GET"})
_POST: Final = frozenset({"POST"})


class OpenAIAdapter(BackendAdapter):
    """The OpenAI-compatible protocol: subclass it for a server that speaks it (override what
    differs: health path, metrics, overload statuses)."""

    type_name = "openai"
    health_path = "/v1/models"
    models_path = "/v1/models"
    endpoints: tuple[Endpoint, ...] = (
        Endpoint("/v1/completions", _POST),
        Endpoint("/v1/chat/completions", _POST),
        Endpoint("/v1/embeddings", _POST),
        Endpoint("/v1/models", _GET, kind="models"),
    )

    def model_of(self, endpoint: Endpoint, path: str, body: bytes) -> str:
        """The JSON body's `model` field; `AdapterError(400)` for a body that is not a JSON object
        with a string `model`."""
        try:
            parsed = loads_body(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise AdapterError(400, f"request body is not valid JSON: {error}") from None
        model = parsed.get("model") if isinstance(parsed, dict) else None
        if not isinstance(model, str) or not model:
            raise AdapterError(400, "request body needs a string `model` field", param="model")
        return model

    def affinity_of(self, endpoint: Endpoint, body: bytes) -> tuple[str | None, str | None]:
        """The `user` field, and the prompt text (`prompt_text`)."""
        try:
            parsed = loads_body(body)
        except (ValueError, UnicodeDecodeError):
            return None, None
        if not isinstance(parsed, dict):
            return None, None
        user = parsed.get("user")
        return (user if isinstance(user, str) and user else None), prompt_text(parsed)

    def error_body(self, status: int, message: str, param: str | None = None) -> bytes:
        """`{"error": {"message", "type", "param", "code"}}` (OpenAI, and vLLM since 0.10.1)."""
        error_type = _ERROR_TYPES.get(status, "RouterError")
        error = {"message": message, "type": error_type, "param": param, "code": status}
        return json.dumps({"error": error}).encode()

    def models_body(self, models: Sequence[str], created: int) -> bytes:
        cards = [
            {"id": name, "object": "model", "created": created, "owned_by": "irmiddleware"} for name in models
        ]
        return json.dumps({"object": "list", "data": cards}).encode()

    def parse_models(self, body: bytes) -> list[str]:
        parsed = json.loads(body)
        return [str(card["id"]) for card in parsed.get("data", []) if isinstance(card, dict) and "id" in card]


def prompt_text(body: Mapping[str, object]) -> str | None:
    """A request's prompt as text: chat messages rendered in order ("role\\ncontent\\n" each, so a
    conversation's next turn extends the previous turn's text), or the completion prompt (the
    first one of a list); None when the body has neither."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for message in messages:
            if isinstance(message, dict):
                content = message.get("content")
                text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
                parts.append(f"{message.get('role')}\n{text}\n")
        return "".join(parts) or None
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0]
    return None
