"""Backend type "tgi": Hugging Face Text Generation Inference.

The adapter is `irmiddleware.adapters.TGIAdapter`; this plugin registers it through the same hook
a third-party plugin uses."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from irmiddleware.adapters import TGIAdapter
from irmiddleware.hooks import BackendAdapter, hookimpl

__all__ = ["TGIAdapter", "irm_adapters"]


@hookimpl
def irm_adapters() -> Mapping[str, Callable[[], BackendAdapter]]:
    return {"tgi": TGIAdapter}
