"""Shared fixtures. Every test that ends with an idle router checks that in-flight counters are
zero (DESIGN.md's one invariant)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from irmiddleware import Router, unlink_shared
from irmiddleware._errors import SharedMemoryError


def assert_idle(router: Router) -> None:
    """Every accelerator of `router` has nothing in flight, and its totals add up."""
    for stats in router.stats():
        assert stats.load == 0, stats
        assert stats.requests_in_flight == 0, stats
        assert stats.routed == stats.completed + stats.failed, stats


@pytest.fixture
def shared_name() -> Iterator[str]:
    """A unique /dev/shm name, unlinked after the test whatever happened."""
    name = f"irm-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    yield name
    try:
        unlink_shared(name)
    except SharedMemoryError:
        pass
