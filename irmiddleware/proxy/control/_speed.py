"""Learned speed: per backend, how fast it fills a prompt and how fast it streams an answer,
estimated online from the answers the router relays, and turned into the core's weights.

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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from irmiddleware.proxy._fleet import Fleet
from irmiddleware.proxy.config import SpeedConfig

__all__ = ["RATE_MAX", "RATE_MIN", "RobustRate", "SpeedBook", "SpeedCollector", "SpeedFeed"]

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


@dataclass(slots=True)
class RobustRate:
    """One online rate estimate (module docstring). `value` is always finite and in
    [`RATE_MIN`, `RATE_MAX`]; `observed_s` is the clock of the last accepted observation."""

    config: SpeedConfig = field(default_factory=SpeedConfig)
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

    def __init__(self, config: SpeedConfig | None = None) -> None:
        self.config = config or SpeedConfig()
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

    def streamed(self, backend_id: int, events: int, duration_s: float, now_s: float) -> bool:
        """An answer streamed `events` events in `duration_s` after its first byte."""
        return self._of(backend_id).decode.observe(events, duration_s, now_s)

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


def _median(values: list[float]) -> float:
    values.sort()
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


class SpeedFeed:
    """A fleet's `SpeedBook`, fed by the proxy's attempts and applied to the core's weights.

    The attempt path calls `first_byte` and `streamed` (a few float operations each); at most
    every `interval_s`, one of those calls also sets every backend's core weight to its configured
    weight * its relative speed. The configured weight is whatever the core held before the feed
    first changed it, or whatever someone else (the admin API) set since."""

    def __init__(self, fleet: Fleet, config: SpeedConfig, block_chars: int) -> None:
        self.book = SpeedBook(config)
        self.fleet = fleet
        self._interval_s = config.interval_s
        self._chars_per_token = config.chars_per_token
        self._block_chars = block_chars
        self._applied_s = -math.inf
        self._configured: dict[int, float] = {}
        self._set: dict[int, float] = {}

    def uncached_tokens(self, prompt_chars: int, matched_blocks: int) -> float:
        """The prompt's tokens the backend had to fill (at least one: the last is always computed)."""
        return max(1.0, (prompt_chars - matched_blocks * self._block_chars) / self._chars_per_token)

    def first_byte(
        self, backend_id: int, prompt_chars: int, matched_blocks: int, ttfb_s: float, now_s: float
    ) -> None:
        self.book.first_byte(backend_id, self.uncached_tokens(prompt_chars, matched_blocks), ttfb_s, now_s)
        if now_s - self._applied_s >= self._interval_s:
            self.apply(now_s)

    def streamed(self, backend_id: int, events: int, duration_s: float, now_s: float) -> None:
        self.book.streamed(backend_id, events, duration_s, now_s)

    def apply(self, now_s: float) -> dict[int, float]:
        """Sets the core's weights from the learned speeds now; returns them (id → weight)."""
        self._applied_s = now_s
        router = self.fleet.router
        for stats in router.stats():
            if stats.id not in self.fleet.backends:
                continue
            if abs(stats.weight - self._set.get(stats.id, math.nan)) > 0.0015 or stats.id not in self._set:
                self._configured[stats.id] = stats.weight  # first sight, or changed by someone else
        for gone in set(self._configured) - set(self.fleet.backends):
            del self._configured[gone]
            self._set.pop(gone, None)
            self.book.forget(gone)
        weights = self.book.weights(self._configured, now_s)
        for backend_id, weight in weights.items():
            if abs(weight - self._set.get(backend_id, math.nan)) <= 0.0015:
                continue
            self.fleet.update_backend(backend_id, weight=weight)
            self._set[backend_id] = router.accelerator_stats(backend_id).weight
        return weights

    def status_of(self, backend_id: int) -> dict[str, Any]:
        return self.book.status_of(backend_id)


class SpeedCollector(Collector):
    """Exports the learned rates at scrape time (`irm_backend_prefill_tokens_per_second`,
    `irm_backend_decode_tokens_per_second`), labelled by backend URL like the core's gauges."""

    def __init__(self, feed: SpeedFeed) -> None:
        self._feed = feed

    def collect(self) -> Iterator[Metric]:
        prefill = GaugeMetricFamily(
            "irm_backend_prefill_tokens_per_second",
            "Learned prefill speed: uncached prompt tokens per second to the first byte.",
            labels=["backend"],
        )
        decode = GaugeMetricFamily(
            "irm_backend_decode_tokens_per_second",
            "Learned decode speed: streamed events per second after the first byte.",
            labels=["backend"],
        )
        backends = self._feed.fleet.backends
        for backend_id, prefill_rate, decode_rate in self._feed.book.rates():
            backend = backends.get(backend_id)
            if backend is None:
                continue
            prefill.add_metric([backend.url], prefill_rate)
            decode.add_metric([backend.url], decode_rate)
        yield from (prefill, decode)
