"""`irmiddleware.testing.wait_until` returns as soon as the condition holds and fails, naming it,
once its deadline passes."""

from __future__ import annotations

import itertools

import pytest

from irmiddleware.testing import wait_until


def test_returns_once_the_condition_holds() -> None:
    calls = itertools.count(1)
    wait_until(lambda: next(calls) >= 3, "third call", timeout_s=5.0, interval_s=0.001)
    assert next(calls) == 4  # polled exactly until the first true answer


def test_fails_naming_the_condition_after_the_deadline() -> None:
    with pytest.raises(AssertionError, match=r"not reached within 0.05 s: backend up"):
        wait_until(lambda: False, "backend up", timeout_s=0.05)


@pytest.mark.parametrize("options", [{"timeout_s": 0}, {"interval_s": -1.0}])
def test_refuses_non_positive_times(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        wait_until(lambda: True, **options)
