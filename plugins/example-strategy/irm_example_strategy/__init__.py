"""`least_latency`: send each request to the backend with the lowest latency EWMA that has room.

A backend with no completed request yet reports 0.0 and so is tried first, which is how a new
backend gets its first measurements. Ties (e.g. all new) go to the least utilized backend.
The router reserves the chosen backend in the native core, so load accounting is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from irmiddleware.hooks import BackendLoad, PythonStrategy, RouteInfo, Strategy, hookimpl

__all__ = ["irm_strategies", "pick_least_latency"]


def pick_least_latency(backends: Sequence[BackendLoad], request: RouteInfo) -> int | None:
    """The id of the active backend with room for `request.cost` and the lowest latency EWMA;
    None when none has room (the router then answers 503)."""
    fits = [b for b in backends if b.state == "active" and b.load + request.cost <= b.capacity]
    if not fits:
        return None
    return min(fits, key=lambda b: (b.latency_ewma_s, b.load / b.capacity, b.id)).id


@hookimpl
def irm_strategies() -> Sequence[Strategy]:
    return [PythonStrategy("least_latency", pick_least_latency)]
