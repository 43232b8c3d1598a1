"""Backend type "triton": NVIDIA Triton (KServe v2).

The adapter is `irmiddleware.adapters.TritonAdapter`; this plugin registers it through the same hook
a third-party plugin uses."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from irmiddleware.adapters import TritonAdapter
from irmiddleware.hooks import BackendAdapter, hookimpl

__all__ = ["TritonAdapter", "irm_adapters"]


@hookimpl
def irm_adapters() -> Mapping[str, Callable[[], BackendAdapter]]:
    return {"triton": TritonAdapter}
