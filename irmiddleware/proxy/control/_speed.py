"""Learned speed in the proxy: the attempts tell a `SpeedBook` (irmiddleware._speed) each answer's
time to first byte and streamed pace, and the learned speeds become the core's weights.

Enabled by `[router.speed] enabled` or by the `least_ttft` strategy. The status document shows
each backend's rates (`prefill_tokens_per_s`, `decode_tokens_per_s`), and /metrics exports them.
The attempts also keep a `BatchClock`: when each backend's batch is next expected to free a slot,
told to the core (`Router.set_batch_timing`) for least_ttft; the status document shows its learned
times (`service_s`, sent to end of an answer, and `decode_s`, first byte to end).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, Final

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from irmiddleware._errors import UnknownBackendError
from irmiddleware._speed import BatchClock, Smoothing, SpeedBook
from irmiddleware.proxy._fleet import Fleet
from irmiddleware.proxy.config import SpeedConfig

__all__ = ["SpeedCollector", "SpeedFeed"]

_PREFILL_TOKENS_MIN: Final = 256
"""Uncached prompt tokens an answer must have filled for its time to first byte to teach the
prefill rate (fewer: the decode rate alone speaks for the backend)."""


class SpeedFeed:
    """A fleet's `SpeedBook`, fed by the proxy's attempts and applied to the core's weights.

    The attempt path calls `first_byte` and `streamed` (a few float operations each); at most
    every `interval_s`, one of those calls also sets every backend's core weight to its configured
    weight * its relative speed. The configured weight is whatever the core held before the feed
    first changed it, or whatever someone else (the admin API) set since."""

    def __init__(self, fleet: Fleet, config: SpeedConfig, block_chars: int, chars_per_token: float) -> None:
        smoothing = Smoothing(
            config.half_life_s, config.alpha_min, config.alpha_max, config.clip, config.stale_s
        )
        self.book = SpeedBook(smoothing)
        self.clock = BatchClock(smoothing)
        self.fleet = fleet
        self._interval_s = config.interval_s
        self._chars_per_token = chars_per_token
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
        uncached = self.uncached_tokens(prompt_chars, matched_blocks)
        # A short fill says little about prefill speed: its time to first byte is mostly fixed
        # cost (the hops, the scheduler's step). Counted as a prefill rate it made a backend
        # that keeps conversations cached (so fills little) look slow, and lose them.
        if uncached >= _PREFILL_TOKENS_MIN:
            self.book.first_byte(backend_id, uncached, ttfb_s, now_s)
        if now_s - self._applied_s >= self._interval_s:
            self.apply(now_s)

    def streamed(self, backend_id: int, events: int, duration_s: float, now_s: float) -> None:
        self.book.streamed(backend_id, events, duration_s, now_s)
        # The answer's length teaches the cost model what an unlimited request brings.
        self.fleet.cost.observe_output(events + 1)

    def sent(self, backend_id: int, attempt: object, now_s: float) -> None:
        """An attempt was sent (`now_s` on the monotonic clock): the batch clock's books."""
        self._tell_core(backend_id, self.clock.sent(backend_id, attempt, now_s))

    def answering(self, backend_id: int, attempt: object, now_s: float) -> None:
        """The attempt's first body byte came."""
        self._tell_core(backend_id, self.clock.first_byte(backend_id, attempt, now_s))

    def done(self, backend_id: int, attempt: object, now_s: float, answered: bool) -> None:
        self._tell_core(backend_id, self.clock.done(backend_id, attempt, now_s, answered))

    def _tell_core(self, backend_id: int, timing: tuple[float | None, float] | None) -> None:
        """Hands the core the batch clock's new timing (None: unchanged, nothing to tell)."""
        if timing is not None:
            with contextlib.suppress(UnknownBackendError):  # removed while its request ran
                self.fleet.router.set_batch_timing(backend_id, *timing)

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
            self.clock.forget(gone)
        weights = self.book.weights(self._configured, now_s)
        for backend_id, weight in weights.items():
            if abs(weight - self._set.get(backend_id, math.nan)) <= 0.0015:
                continue
            self.fleet.update_backend(backend_id, weight=weight)
            self._set[backend_id] = router.accelerator_stats(backend_id).weight
        return weights

    def status_of(self, backend_id: int) -> dict[str, Any]:
        return {
            **self.book.status_of(backend_id),
            "service_s": round(self.clock.service_s(backend_id), 6),
            "decode_s": round(self.clock.decode_s(backend_id), 6),
        }


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
