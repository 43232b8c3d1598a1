"""Checks of the one accounting invariant, for our tests and for users testing their plugins."""

from __future__ import annotations

from irmiddleware._router import Router


def assert_idle(router: Router) -> None:
    """Raises AssertionError unless every accelerator of `router` has nothing in flight and its
    totals add up (routed = completed + failed). Call it when all traffic has ended."""
    for stats in router.stats():
        if stats.load != 0 or stats.requests_in_flight != 0:
            raise AssertionError(f"accelerator {stats.id} still has load in flight: {stats}")
        if stats.routed != stats.completed + stats.failed:
            raise AssertionError(f"accelerator {stats.id}: routed != completed + failed: {stats}")
