"""Backend type "openai": any OpenAI-compatible server (SGLang, llama.cpp, LiteLLM, ...).

The adapter is `irmiddleware.adapters.OpenAIAdapter`; this plugin registers it through the same hook
a third-party plugin uses."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from irmiddleware.adapters import OpenAIAdapter
from irmiddleware.hooks import BackendAdapter, hookimpl

__all__ = ["OpenAIAdapter", "irm_adapters"]


@hookimpl
def irm_adapters() -> Mapping[str, Callable[[], BackendAdapter]]:
    return {"openai": OpenAIAdapter}
