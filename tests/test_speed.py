"""Learned speed (`irmiddleware.proxy.control.SpeedFeed` and its estimator): whatever sequence of
observations arrives (zeros, negative or non-finite durations, huge values, a clock that jumps
back or far ahead), every estimate and every weight stays finite and positive; one outlier moves a
warm estimate by a bounded step; a lasting change is followed; relative speeds rank backends by
their rates; a stale estimate stops counting; and a short fill does not teach the prefill rate.
Clocks here are numbers the test gives."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from irmiddleware._speed import RATE_MAX, RATE_MIN, RobustRate, Smoothing, SpeedBook
from irmiddleware.proxy.config import ConfigError, SpeedConfig, parse_config
from irmiddleware.proxy.control import SpeedFeed

anything = st.floats(allow_nan=True, allow_infinity=True)
observation = st.tuples(anything, anything, anything)


@settings(deadline=None)
@given(st.lists(observation, max_size=60))
def test_an_estimate_stays_finite_and_positive(observations: list[tuple[float, float, float]]) -> None:
    rate = RobustRate(Smoothing())
    for amount, duration_s, now_s in observations:
        rate.observe(amount, duration_s, now_s)
        if rate.log_rate is not None:
            assert RATE_MIN * 0.999 <= rate.value <= RATE_MAX * 1.001
            assert math.isfinite(rate.scale) and rate.scale > 0
            assert math.isfinite(rate.observed_s)


@settings(deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.booleans(), anything, anything, anything), max_size=60),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12),
)
def test_weights_stay_finite_and_positive(
    observations: list[tuple[int, bool, float, float, float]], now_s: float
) -> None:
    book = SpeedBook(Smoothing())
    for backend, prefill, amount, duration_s, at_s in observations:
        if prefill:
            book.first_byte(backend, amount, duration_s, at_s)
        else:
            book.streamed(
                backend, int(amount) if math.isfinite(amount) and abs(amount) < 1e18 else 0, duration_s, at_s
            )
    weights = book.weights({0: 1.0, 1: 2.0, 2: 0.5, 3: 1000.0}, now_s)
    assert set(weights) == {0, 1, 2, 3}
    for weight in weights.values():
        assert math.isfinite(weight) and 0.001 <= weight <= 1000.0


def test_observations_that_say_nothing_change_nothing() -> None:
    rate = RobustRate(Smoothing())
    for amount, duration_s in ((0, 1), (10, 0), (10, -1), (-5, 1), (math.nan, 1), (10, math.inf)):
        assert not rate.observe(amount, duration_s, 1.0)
    assert rate.log_rate is None and rate.count == 0


def test_one_outlier_moves_a_warm_estimate_by_a_bounded_step() -> None:
    rate = RobustRate(Smoothing())
    for step in range(50):
        rate.observe(100, 1.0, step * 0.1)  # 100 tokens/s, often
    before = rate.value
    rate.observe(1, 100.0, 5.1)  # one answer 10 000x slower (a stall)
    assert before * 0.5 < rate.value < before
    rate.observe(1e9, 1.0, 5.2)  # and one absurdly fast (a cached prompt)
    assert rate.value < before * 2


def test_a_lasting_change_is_followed() -> None:
    rate = RobustRate(Smoothing())
    now = 0.0
    for _ in range(50):
        now += 0.1
        rate.observe(100, 1.0, now)
    for _ in range(40):  # 2x slower from here on
        now += 0.1
        rate.observe(50, 1.0, now)
    assert 45 < rate.value < 60


def test_a_clock_jumping_back_or_far_ahead_keeps_the_estimate_sane() -> None:
    rate = RobustRate(Smoothing())
    rate.observe(100, 1.0, 1e9)
    rate.observe(100, 1.0, -1e9)  # back: counts as "at once", the later stamp is kept
    assert rate.observed_s == 1e9
    rate.observe(50, 1.0, 1e300)  # far ahead: at most alpha_max of a step
    assert 50 <= rate.value < 100


def test_relative_speed_ranks_backends_and_forgets_stale_ones() -> None:
    book = SpeedBook(Smoothing(stale_s=10.0))
    for step in range(30):
        now = step * 0.1
        book.first_byte(0, 1000, 0.1, now)  # 10 000 tokens/s
        book.first_byte(1, 1000, 0.2, now)  # 5 000
        book.streamed(0, 100, 1.0, now)
        book.streamed(1, 50, 1.0, now)
    relative = book.relative([0, 1, 2], 3.0)
    assert relative[0] > relative[2] > relative[1]  # 2 has no estimate: the median
    weights = book.weights({0: 1.0, 1: 1.0, 2: 1.0}, 3.0)
    assert weights[0] > weights[1]
    assert book.relative([0, 1, 2], 100.0) == {0: 1.0, 1: 1.0, 2: 1.0}  # all stale
    status = book.status_of(1)
    assert 4000 < status["prefill_tokens_per_s"] < 6000 and 40 < status["decode_tokens_per_s"] < 60
    assert book.status_of(7) == {"prefill_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0}


def test_a_bad_speed_section_is_one_clear_config_error() -> None:
    backends = [{"url": "http://127.0.0.1:9", "models": ["m"]}]
    with pytest.raises(ConfigError, match="alpha_min"):
        parse_config({"router": {"speed": {"alpha_min": 0.9, "alpha_max": 0.5}}, "backends": backends})
    with pytest.raises(ConfigError, match="half_life_s"):
        parse_config({"router": {"speed": {"half_life_s": 0}}, "backends": backends})
    assert parse_config({"router": {"speed": {"enabled": True}}, "backends": backends}).speed.enabled


# The little of a proxy fleet a `SpeedFeed` reads when it applies weights: no backends.
_NO_FLEET = SimpleNamespace(backends={}, router=SimpleNamespace(stats=list))


def test_a_short_fill_does_not_teach_the_prefill_rate() -> None:
    # A conversation kept on its backend fills only its new message: its time to first byte is
    # mostly fixed cost. Taken as a prefill rate it made the backend that keeps the cache look
    # slow (10 tokens in 20 ms: 500 tokens/s against 10 000 for a long fill) and lose its share.
    feed = SpeedFeed(_NO_FLEET, SpeedConfig(enabled=True), block_chars=64, chars_per_token=4.0)  # type: ignore[arg-type]
    feed.first_byte(0, prompt_chars=40, matched_blocks=0, ttfb_s=0.02, now_s=1.0)
    assert feed.status_of(0)["prefill_tokens_per_s"] == 0.0
    feed.first_byte(0, prompt_chars=6400 + 40, matched_blocks=100, ttfb_s=0.02, now_s=1.1)
    assert feed.status_of(0)["prefill_tokens_per_s"] == 0.0  # 10 tokens left to fill: still short
    feed.first_byte(0, prompt_chars=4000, matched_blocks=0, ttfb_s=0.1, now_s=1.2)
    assert feed.status_of(0)["prefill_tokens_per_s"] == pytest.approx(10_000)
