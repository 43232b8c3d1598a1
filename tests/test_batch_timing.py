"""Batch timing: when a backend's full batch frees its next slot, from the books of the requests
in flight there (`irmiddleware._speed.BatchClock`), told to the core (`Router.set_batch_timing`).
least_ttft then waits for a slot that frees in a moment instead of leaving the conversation's
cache, and leaves for a slot that frees only after most of a service. The books learn the service
and decode times from whole answers only, hand the core a finite time or "not known" whatever the
clock says, and forget every request once it is done. Clocks here are numbers the test gives,
except where the core compares with its own monotonic clock (`time.monotonic()`)."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from irmiddleware import Accelerator, Router
from irmiddleware._speed import BatchClock
from irmiddleware.testing import assert_idle

BLOCKS = 7  # prompt blocks of the conversation, all cached where it ran


def _hashes() -> list[int]:
    return [1000 + block for block in range(BLOCKS)]


def test_the_next_slot_frees_at_the_earliest_expected_end() -> None:
    clock = BatchClock()
    assert clock.sent(0, "a", 10.0) == (None, 0.0)  # nothing learned yet: not known
    assert clock.first_byte(0, "a", 10.1) is None  # still nothing to tell
    assert clock.done(0, "a", 11.0, answered=True) == (None, 1.0)  # learned: 1 s sent to end
    assert clock.decode_s(0) == pytest.approx(0.9)
    assert clock.sent(0, "b", 20.0) == (21.0, 1.0)  # sent + one service
    # b's first byte comes late (it waited in the engine's queue): its end is first byte + decode.
    assert clock.first_byte(0, "b", 20.8) == (pytest.approx(21.7), 1.0)
    assert clock.sent(0, "c", 20.9) is None  # later: the earliest end stays b's
    timing = clock.done(0, "b", 21.5, answered=False)  # cut off: teaches nothing
    assert timing == (pytest.approx(21.9), 1.0)  # c's end, sent + service
    assert clock.service_s(0) == 1.0
    assert clock.done(0, "unknown", 22.0, answered=True) is None
    assert clock.in_flight(0) == 1
    clock.forget(0)
    assert clock.in_flight(0) == 0 and clock.service_s(0) == 0.0


anything = st.floats(allow_nan=True, allow_infinity=True)
event = st.tuples(
    st.sampled_from(("sent", "first_byte", "done")), st.integers(0, 2), st.integers(0, 5), anything
)


@settings(deadline=None)
@given(st.lists(event, max_size=80), st.booleans())
def test_the_books_stay_finite_and_forget_every_request_once_done(
    events: list[tuple[str, int, int, float]], answered: bool
) -> None:
    clock = BatchClock()
    for kind, backend, request, at_s in events:
        if kind == "sent":
            timing = clock.sent(backend, request, at_s)
        elif kind == "first_byte":
            timing = clock.first_byte(backend, request, at_s)
        else:
            timing = clock.done(backend, request, at_s, answered)
        if timing is not None:
            free_at, service_s = timing
            assert free_at is None or math.isfinite(free_at)
            assert math.isfinite(service_s) and service_s >= 0
    for backend in range(3):
        for request in range(6):
            clock.done(backend, request, 1e6, answered)
        assert clock.in_flight(backend) == 0


def _router(batch_slots: int) -> Router:
    # block_cost 0.06: moving costs 7 x 0.06 = 0.42 of a request; staying costs the wait for a
    # slot, a near-tie (within 25 %) up to 0.525 of a service.
    router = Router("least_ttft", block_cost=0.06)
    for accelerator in range(3):
        router.add_accelerator(Accelerator(accelerator, 1000))
        router.set_batch_slots(accelerator, batch_slots)
    return router


@pytest.mark.parametrize(
    ("free_in_s", "stays"),
    [(None, False), (0.05, True), (0.9, False), (-0.02, True), (-5.0, False)],
)
def test_a_conversation_waits_only_for_a_slot_that_frees_soon(free_in_s: float | None, stays: bool) -> None:
    with _router(4) as router:
        first = router.acquire(prefix_hashes=_hashes())
        assert first is not None
        home = first.accelerator_id
        held = [router.acquire_on(home, 1) for _ in range(3)]  # home's batch of 4 is full
        busy = next(accelerator for accelerator in range(3) if accelerator != home)
        # Load elsewhere keeps home within its bounded load; `busy` has a long queue.
        held += [router.acquire_on(busy, 1) for _ in range(12)]
        free_at = None if free_in_s is None else time.monotonic() + free_in_s
        router.set_batch_timing(home, free_at, 1.0)
        again = router.acquire(prefix_hashes=_hashes())
        assert again is not None
        assert (again.accelerator_id == home) is stays, (free_in_s, again.accelerator_id)
        for lease in (first, again, *held):
            assert lease is not None
            lease.release()
        assert_idle(router)


def test_bad_batch_timing_is_refused_clearly() -> None:
    with Router("least_ttft") as router:
        router.add_accelerator(Accelerator(0, 10))
        for bad_service in (-1.0, math.nan, math.inf, 1e9, "1"):
            with pytest.raises(ValueError, match="service_s"):
                router.set_batch_timing(0, 1.0, bad_service)  # type: ignore[arg-type]
        for bad_time in (-1.0, math.nan, math.inf, "now"):
            with pytest.raises(ValueError, match="slot_free_at"):
                router.set_batch_timing(0, bad_time, 1.0)  # type: ignore[arg-type]
        router.set_batch_timing(0, time.monotonic() + 0.1, 0.5)
        router.set_batch_timing(0, None, 0.0)
        with pytest.raises(LookupError):
            router.set_batch_timing(7, None, 0.0)
