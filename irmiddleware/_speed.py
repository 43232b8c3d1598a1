"""Learned speed: per backend, how fast it fills a prompt and how fast it streams an answer,
estimated online from observed answers (the proxy's attempts, the simulator's requests).

Two rates per backend, both in tokens per second:
- *prefill*: uncached prompt tokens over the time to the first byte of the answer (queueing on
  the backend included: a backend that is busy is, for the next request, slow);
- *decode*: streamed events over the time from the first byte to the end of the answer (one
  event ≈ one token for an OpenAI-style stream).

Each rate is a `RobustRate`: an exponentially weighted mean of the rate's logarithm whose steps
are clipped at a few mean absolute deviations (a Huber-style estimate: one stalled answer or one
cached prompt moves it by a bounded amount, a lasting change moves it within a few answers), with
a weight that grows with the time since the last observation (an estimate not refreshed for a
while is mostly replaced by the next observation). Any observation is accepted as input; those
that say nothing (a zero, negative or non-finite duration or size) are dropped, and every value
the estimate can take is clamped to a finite positive range, whatever the clock does.

`SpeedBook.weights` compares each backend with the pool's median and gives the core a weight of
configured weight * relative speed; an estimate older than `stale_s` counts as unknown (relative
speed 1), so a backend that stopped getting traffic is not judged on old news forever.

Pure book-keeping on a clock it is given (no I/O, no time read): the proxy
(`proxy.control.SpeedFeed`) and the simulator feed it their own clocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["RATE_MAX", "RATE_MIN", "BatchClock", "RobustRate", "Smoothing", "SpeedBook"]

RATE_MIN: Final = 1e-3
"""Tokens per second: the slowest rate an estimate may report."""
RATE_MAX: Final = 1e9
"""Tokens per second: the fastest rate an estimate may report."""
_LOG_MIN: Final = math.log(RATE_MIN)
_LOG_MAX: Final = math.log(RATE_MAX)
_SCALE_MIN: Final = 0.05  # log units: steps are never clipped tighter than ±(clip * 5 %)
_SCALE_MAX: Final = 5.0
_RELATIVE_MIN: Final = 0.05
_RELATIVE_MAX: Final = 20.0


@dataclass(frozen=True, slots=True)
class Smoothing:
    """How fast estimates follow changes (the proxy's `[router.speed]` keys of the same names)."""

    half_life_s: float = 2.0
    """An observation this long after the previous one has weight 1/2 (within the bounds)."""
    alpha_min: float = 0.1
    """The weight of an observation right after the previous one (bursts still move it)."""
    alpha_max: float = 0.5
    """The largest weight of one observation (a single one never replaces a warm estimate)."""
    clip: float = 2.5
    """Steps are clipped at this many mean absolute deviations (log space)."""
    stale_s: float = 60.0
    """An estimate not refreshed for this long counts as unknown in `weights`."""


@dataclass(slots=True)
class RobustRate:
    """One online rate estimate (module docstring). `value` is always finite and in
    [`RATE_MIN`, `RATE_MAX`]; `observed_s` is the clock of the last accepted observation."""

    config: Smoothing = field(default_factory=Smoothing)
    log_rate: float | None = None
    scale: float = 0.5
    observed_s: float = 0.0
    count: int = 0

    @property
    def value(self) -> float:
        if self.log_rate is None:
            return 0.0
        return math.exp(self.log_rate)

    def observe(self, amount: float, duration_s: float, now_s: float) -> bool:
        """Adds `amount` per `duration_s` seen at `now_s`; False (nothing changed) when the pair
        says nothing about a rate (zero, negative or non-finite)."""
        if not (amount > 0 and duration_s > 0 and math.isfinite(amount) and math.isfinite(duration_s)):
            return False
        if not math.isfinite(now_s):
            return False
        sample = min(max(math.log(amount) - math.log(duration_s), _LOG_MIN), _LOG_MAX)
        self.count += 1
        if self.log_rate is None:
            self.log_rate, self.observed_s = sample, now_s
            return True
        alpha = self._alpha(now_s - self.observed_s)
        # A clock that went back keeps the later stamp: the next interval is not made negative.
        self.observed_s = max(self.observed_s, now_s)
        limit = self.config.clip * self.scale
        step = min(max(sample - self.log_rate, -limit), limit)
        self.log_rate = min(max(self.log_rate + alpha * step, _LOG_MIN), _LOG_MAX)
        # Clipped steps that keep hitting the limit widen it (a lasting change is followed).
        self.scale = min(max(self.scale + alpha * (abs(step) - self.scale), _SCALE_MIN), _SCALE_MAX)
        return True

    def _alpha(self, elapsed_s: float) -> float:
        config = self.config
        if not elapsed_s > 0:  # also NaN: a clock jump back counts as "at once"
            return config.alpha_min
        fresh = 1.0 - math.pow(0.5, min(elapsed_s / config.half_life_s, 64.0))
        return min(max(fresh, config.alpha_min), config.alpha_max)

    def fresh(self, now_s: float) -> bool:
        return self.log_rate is not None and abs(now_s - self.observed_s) <= self.config.stale_s


@dataclass(slots=True)
class _Backend:
    prefill: RobustRate
    decode: RobustRate


class SpeedBook:
    """The learned speeds of a fleet's backends, by id. The proxy's attempts call
    `first_byte` and `streamed`; `weights` says what the core's weights should be."""

    def __init__(self, config: Smoothing | None = None) -> None:
        self.config = config or Smoothing()
        self._backends: dict[int, _Backend] = {}

    def _of(self, backend_id: int) -> _Backend:
        backend = self._backends.get(backend_id)
        if backend is None:
            backend = _Backend(RobustRate(self.config), RobustRate(self.config))
            self._backends[backend_id] = backend
        return backend

    def first_byte(self, backend_id: int, uncached_tokens: float, ttfb_s: float, now_s: float) -> bool:
        """A first byte `ttfb_s` after the request (of `uncached_tokens` to fill) was sent."""
        return self._of(backend_id).prefill.observe(uncached_tokens, ttfb_s, now_s)

    def streamed(self, backend_id: int, amount: float, duration_s: float, now_s: float) -> bool:
        """An answer streamed `amount` tokens (events, work) in `duration_s` after its first byte."""
        return self._of(backend_id).decode.observe(amount, duration_s, now_s)

    def forget(self, backend_id: int) -> None:
        self._backends.pop(backend_id, None)

    def relative(self, members: Iterable[int], now_s: float) -> dict[int, float]:
        """Each member's speed over the members' median, as the geometric mean of its prefill
        and decode ratios (a rate not known or stale counts as the median); in [0.05, 20]."""
        ids = list(members)
        ratios: dict[int, float] = dict.fromkeys(ids, 0.0)
        for kind in ("prefill", "decode"):
            logs: dict[int, float] = {}
            for member in ids:
                backend = self._backends.get(member)
                rate = None if backend is None else backend.prefill if kind == "prefill" else backend.decode
                if rate is not None and rate.log_rate is not None and rate.fresh(now_s):
                    logs[member] = rate.log_rate
            if not logs:
                continue
            median = _median(list(logs.values()))
            for member, value in logs.items():
                ratios[member] += (value - median) / 2
        return {
            member: min(max(math.exp(ratio), _RELATIVE_MIN), _RELATIVE_MAX)
            for member, ratio in ratios.items()
        }

    def weights(self, configured: dict[int, float], now_s: float) -> dict[int, float]:
        """The core weight of each backend of `configured` (id → configured weight): configured
        * relative speed, kept in the core's range (0.001 … 1000)."""
        relative = self.relative(configured, now_s)
        return {
            member: min(max(weight * relative[member], 0.001), 1000.0)
            for member, weight in configured.items()
        }

    def status_of(self, backend_id: int) -> dict[str, Any]:
        """The learned rates for the status document (tokens per second; 0 = nothing yet)."""
        backend = self._backends.get(backend_id)
        if backend is None:
            return {"prefill_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0}
        return {
            "prefill_tokens_per_s": round(backend.prefill.value, 3),
            "decode_tokens_per_s": round(backend.decode.value, 3),
        }

    def rates(self) -> list[tuple[int, float, float]]:
        """(id, prefill, decode) of every backend observed so far, for the metrics."""
        return [(member, b.prefill.value, b.decode.value) for member, b in sorted(self._backends.items())]


class BatchClock:
    """Per backend: when its batch is next expected to free a slot, from the requests in flight
    there that we sent, and how long one request's service takes there.

    Each request in flight has an expected end: sent + the backend's learned service (time from
    sent to the end of the answer) until its first byte comes, then first byte + the learned
    decode time (first byte to end), which no longer counts any wait in the engine's queue. The
    next slot frees at the earliest expected end. Both times are `RobustRate`s (of answers per
    second), learned from whole answers only. Requests other routers or processes sent there are
    not in these books (the core's count has them): a full batch of those is waited for a whole
    service. `sent`, `first_byte` and `done` return what to tell the core
    (`Router.set_batch_timing`): (slot free at or None, service) when it moved by a millisecond
    or more, else None. O(requests in flight there) per call. Pure book-keeping on a given clock."""

    def __init__(self, config: Smoothing | None = None) -> None:
        self.config = config or Smoothing()
        # backend -> request -> [sent, first byte (0: not yet), expected end (0: not known)]
        self._in_flight: dict[int, dict[object, list[float]]] = {}
        self._service: dict[int, RobustRate] = {}
        self._decode: dict[int, RobustRate] = {}
        self._told: dict[int, tuple[float | None, float]] = {}

    def service_s(self, backend_id: int) -> float:
        """The learned time from sent to the end of an answer (0: not known yet)."""
        return _period(self._service.get(backend_id))

    def decode_s(self, backend_id: int) -> float:
        """The learned time from an answer's first byte to its end (0: not known yet)."""
        return _period(self._decode.get(backend_id))

    def sent(self, backend_id: int, request: object, now_s: float) -> tuple[float | None, float] | None:
        """`request` (any hashable, its own) was sent to the backend at `now_s`."""
        service = self.service_s(backend_id)
        in_flight = self._in_flight.setdefault(backend_id, {})
        in_flight[request] = [now_s, 0.0, now_s + service if service else 0.0]
        return self._timing(backend_id)

    def first_byte(self, backend_id: int, request: object, now_s: float) -> tuple[float | None, float] | None:
        entry = self._in_flight.get(backend_id, {}).get(request)
        if entry is None:
            return None
        decode = self.decode_s(backend_id)
        entry[1] = now_s
        if decode:
            entry[2] = now_s + decode
        return self._timing(backend_id)

    def done(
        self, backend_id: int, request: object, now_s: float, answered: bool
    ) -> tuple[float | None, float] | None:
        """`request` ended at `now_s`; `answered`: its whole answer came (it teaches the times).
        Unknown requests are ignored."""
        entry = self._in_flight.get(backend_id, {}).pop(request, None)
        if entry is None:
            return None
        sent_s, first_s, _ = entry
        if answered:
            _observe(self._service, backend_id, now_s - sent_s, now_s, self.config)
            if first_s:
                _observe(self._decode, backend_id, now_s - first_s, now_s, self.config)
        return self._timing(backend_id)

    def in_flight(self, backend_id: int) -> int:
        """Requests sent to the backend and not done yet."""
        return len(self._in_flight.get(backend_id, ()))

    def forget(self, backend_id: int) -> None:
        for book in (self._in_flight, self._service, self._decode, self._told):
            book.pop(backend_id, None)

    def _timing(self, backend_id: int) -> tuple[float | None, float] | None:
        service = self.service_s(backend_id)
        ends = [
            end for _, _, end in self._in_flight.get(backend_id, {}).values() if end and math.isfinite(end)
        ]
        timing = (min(ends) if ends and service else None, service)
        told = self._told.get(backend_id)
        if (
            told is not None
            and abs((told[0] or 0) - (timing[0] or 0)) < 1e-3
            and abs(told[1] - service) < 1e-3
        ):
            return None
        self._told[backend_id] = timing
        return timing


def _period(rate: RobustRate | None) -> float:
    return 0.0 if rate is None or rate.log_rate is None else 1 / rate.value


def _observe(
    book: dict[int, RobustRate], backend_id: int, duration_s: float, now_s: float, config: Smoothing
) -> None:
    rate = book.get(backend_id)
    if rate is None:
        rate = book[backend_id] = RobustRate(config)
    rate.observe(1.0, duration_s, now_s)


def _median(values: list[float]) -> float:
    values.sort()
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
