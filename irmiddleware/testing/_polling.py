"""`wait_until`: bounded polling for tests that watch servers change state."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["wait_until"]


def wait_until(
    predicate: Callable[[], object], what: str = "condition", timeout_s: float = 5.0, interval_s: float = 0.01
) -> None:
    """Calls `predicate` every `interval_s` until it returns something true; raises AssertionError
    naming `what` when `timeout_s` passes first. A deadline, never a sleep-and-hope: the wait is as
    short as the condition allows and as long as `timeout_s` at most."""
    if timeout_s <= 0 or interval_s <= 0:
        raise ValueError("timeout_s and interval_s must be positive")
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not reached within {timeout_s} s: {what}")
        time.sleep(interval_s)
