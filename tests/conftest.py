"""Shared fixtures. Every test that ends with an idle router checks that in-flight counters are
zero (the one accounting invariant, doc/architecture.md) with `irmiddleware.testing.assert_idle`."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest

from irmiddleware import unlink_shared
from irmiddleware._errors import SharedMemoryError


@pytest.fixture
def shared_name() -> Iterator[str]:
    """A unique /dev/shm name, unlinked after the test whatever happened."""
    name = f"irm-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    yield name
    with contextlib.suppress(SharedMemoryError):  # The test may have unlinked it already.
        unlink_shared(name)
