"""Built-in adapter for any OpenAI-compatible server (SGLang, llama.cpp, LiteLLM, ...): the OpenAI
paths, the model from the JSON body, OpenAI-style errors, health = `GET /v1/models` answers 2xx."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from irmiddleware.hooks import BackendAdapter, hookimpl

__all__ = ["OpenAIAdapter", "irm_adapters"]


class OpenAIAdapter(BackendAdapter):
    """The OpenAI-compatible protocol; `BackendAdapter`'s defaults are exactly that."""

    type_name = "openai"


@hookimpl
def irm_adapters() -> Mapping[str, Callable[[], BackendAdapter]]:
    return {"openai": OpenAIAdapter}
