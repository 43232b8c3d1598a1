"""Backend type "vllm": vLLM.

The adapter is `irmiddleware.adapters.VLLMAdapter`; this plugin registers it through the same hook
a third-party plugin uses."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from irmiddleware.adapters import VLLMAdapter
from irmiddleware.hooks import BackendAdapter, hookimpl

__all__ = ["VLLMAdapter", "irm_adapters"]


@hookimpl
def irm_adapters() -> Mapping[str, Callable[[], BackendAdapter]]:
    return {"vllm": VLLMAdapter}
