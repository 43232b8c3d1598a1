"""Built-in strategies: the native core's strategies, registered by name through the same hook a
third-party strategy plugin uses."""

from __future__ import annotations

from collections.abc import Sequence

from irmiddleware import STRATEGIES
from irmiddleware.hooks import NativeStrategy, Strategy, hookimpl

__all__ = ["irm_strategies"]


@hookimpl
def irm_strategies() -> Sequence[Strategy]:
    return [NativeStrategy(name, name) for name in sorted(STRATEGIES)]
