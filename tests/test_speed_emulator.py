"""The emulators' `speed` (every prefill and decode step takes 1/speed as long): a value that is
not a finite positive number is refused with a clear error. (A slowdown and its recovery, seen by
the router's learned speed, are in tests/proxy/test_speed_proxy.py.)"""

from __future__ import annotations

import pytest

from irmiddleware.testing import VLLMConfig


def test_speed_must_be_a_positive_finite_number() -> None:
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="speed"):
            VLLMConfig(speed=bad)
    assert VLLMConfig(speed=0.5).speed == 0.5
