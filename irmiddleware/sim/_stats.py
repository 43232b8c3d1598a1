"""What a simulation run measured, per strategy, and the comparison table.

Latency is from a request's arrival to its last token, including any retry backoff; time to first
token likewise to its first. Rejected and failed requests have no latency: they are counted in the
rejection and failure rates instead, so a strategy cannot look fast by turning requests away.
Utilisation of an accelerator is its time-averaged cost in flight divided by its capacity, over the
whole run (time 0 to the last completion). The bound is the core's bounded-load rule averaged over
time: no accelerator above (1+ε) * the fleet's capacity-weighted mean utilisation; at each admission
the simulator also measures how many cost units the chosen accelerator went over
⌈(1+ε) * fleet cost in flight * its capacity share⌉.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

HISTOGRAM_BINS = 10


@dataclass(frozen=True, slots=True)
class Percentiles:
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, ordered: Sequence[float]) -> Percentiles | None:
        """Nearest-rank percentiles of already sorted values; None when there are none."""
        if not ordered:
            return None
        return cls(_rank(ordered, 0.50), _rank(ordered, 0.90), _rank(ordered, 0.99), ordered[-1])


def _rank(ordered: Sequence[float], quantile: float) -> float:
    return ordered[max(0, math.ceil(quantile * len(ordered)) - 1)]


@dataclass(frozen=True, slots=True)
class Outage:
    """A failure window and how many requests the core routed to that accelerator during it (read
    from the core's own `routed` counter at the window's ends; it must be 0)."""

    accelerator: int
    down_s: float
    up_s: float | None
    routed_while_down: int


@dataclass(frozen=True, slots=True)
class Affinity:
    """How the core's affinity decisions went: the affine backend took the request (hit), nothing
    was remembered (miss), or the affine backend was over its bound and another took it."""

    hits: int = 0
    misses: int = 0
    overloads: int = 0

    @classmethod
    def of(cls, outcomes: Mapping[str | None, int]) -> Affinity:
        """From counts keyed by `Router.acquire_slot_affine`'s affinity ("hit", "miss", ...)."""
        return cls(outcomes.get("hit", 0), outcomes.get("miss", 0), outcomes.get("overload", 0))

    @property
    def decisions(self) -> int:
        return self.hits + self.misses + self.overloads


@dataclass(frozen=True)
class StrategyResult:
    """One strategy's run. Equal results (==) mean identical numbers, down to every latency."""

    strategy: str
    requests: int
    completed: int
    rejected: int
    failed: int
    retries: int
    duration_s: float
    arrivals_end_s: float
    completed_by_arrivals_end: int
    output_tokens: int
    latency: Percentiles | None
    ttft: Percentiles | None
    utilisation: tuple[float, ...]
    outages: tuple[Outage, ...] = ()
    latencies_s: array[float] = field(default_factory=lambda: array("d"), repr=False)
    ttfts_s: array[float] = field(default_factory=lambda: array("d"), repr=False)
    capacities: tuple[int, ...] = ()
    balance_epsilon: float = 0.25
    bound_excess_max: int = 0
    prompt_blocks: int = 0
    cached_blocks: int = 0
    affinity: Affinity = Affinity()
    routed_s: array[float] = field(default_factory=lambda: array("d"), repr=False)
    """When each routed request was admitted (with `routed_to`: the share over time)."""
    routed_to: array[int] = field(default_factory=lambda: array("i"), repr=False)
    """The accelerator each routed request went to, in the order of `routed_s`."""

    @property
    def cache_hit_rate(self) -> float | None:
        """Cached prompt blocks over prompt blocks (None when prefix caching was not modelled)."""
        return self.cached_blocks / self.prompt_blocks if self.prompt_blocks else None

    @property
    def mean_utilisation(self) -> float:
        """The fleet's utilisation: cost in flight over capacity, both summed over accelerators."""
        if not self.capacities:
            return _mean(self.utilisation)
        busy = sum(u * c for u, c in zip(self.utilisation, self.capacities, strict=True))
        return busy / sum(self.capacities)

    @property
    def utilisation_bound(self) -> float:
        """(1+ε) * the fleet's utilisation: the bounded-load rule's limit, averaged over time."""
        return (1 + self.balance_epsilon) * self.mean_utilisation

    @property
    def throughput_rps(self) -> float:
        """Completions per second while requests kept arriving. The drain after the last arrival
        is left out: its length is set by the last few (random) requests, not by the strategy."""
        if self.arrivals_end_s <= 0:
            return 0.0
        return self.completed_by_arrivals_end / self.arrivals_end_s

    @property
    def tokens_per_s(self) -> float:
        """Output tokens per second over the whole run (arrival to last completion)."""
        return self.output_tokens / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def rejection_rate(self) -> float:
        return self.rejected / self.requests if self.requests else 0.0

    @property
    def failure_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0

    @property
    def imbalance(self) -> float:
        """Max over mean utilisation (1.0 = perfectly even)."""
        mean = _mean(self.utilisation)
        return max(self.utilisation) / mean if mean > 0 else 1.0

    @property
    def utilisation_cv(self) -> float:
        """Coefficient of variation of utilisation across accelerators (0 = perfectly even)."""
        mean = _mean(self.utilisation)
        if mean <= 0:
            return 0.0
        variance = sum((u - mean) ** 2 for u in self.utilisation) / len(self.utilisation)
        return math.sqrt(variance) / mean

    def utilisation_histogram(self, bins: int = HISTOGRAM_BINS) -> list[int]:
        """How many accelerators fall in each utilisation bucket [0, 1/bins), ..., [.., 1]."""
        counts = [0] * bins
        for value in self.utilisation:
            counts[min(bins - 1, max(0, int(value * bins)))] += 1
        return counts


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def format_table(results: Sequence[StrategyResult]) -> str:
    """A fixed-width comparison, one row per strategy; with prefix caching modelled, also the
    cache hit rate and the busiest accelerator's utilisation against the bounded-load limit."""
    with_ttft = any(result.ttft is not None for result in results)
    with_cache = any(result.cache_hit_rate is not None for result in results)
    header = ["strategy", "done", "rej%", "fail%", "req/s", "p50 s", "p90 s", "p99 s", "max s"]
    if with_ttft:
        header += ["ttft p50", "ttft p99"]
    header += ["util max/mean", "util cv"]
    if with_cache:
        header += ["hit%", "util max", "bound"]
    rows = [_row(result, with_ttft) + (_cache_cells(result) if with_cache else []) for result in results]
    return format_columns([header, *rows], rule=True)


def format_columns(rows: Sequence[Sequence[str]], *, rule: bool = False) -> str:
    """Right-aligned columns, two spaces apart; `rule` underlines the first row."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    if rule:
        lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _row(result: StrategyResult, with_ttft: bool) -> list[str]:
    latency = result.latency
    row = [
        result.strategy,
        str(result.completed),
        f"{100 * result.rejection_rate:.2f}",
        f"{100 * result.failure_rate:.2f}",
        f"{result.throughput_rps:.1f}",
        *(_seconds(latency, name) for name in ("p50", "p90", "p99", "max")),
    ]
    if with_ttft:
        row += [_seconds(result.ttft, "p50"), _seconds(result.ttft, "p99")]
    row += [f"{result.imbalance:.2f}", f"{result.utilisation_cv:.3f}"]
    return row


def _cache_cells(result: StrategyResult) -> list[str]:
    rate = result.cache_hit_rate
    return [
        "-" if rate is None else f"{100 * rate:.1f}",
        f"{max(result.utilisation):.3f}",
        f"{result.utilisation_bound:.3f}",
    ]


def _seconds(percentiles: Percentiles | None, name: str) -> str:
    return "-" if percentiles is None else f"{getattr(percentiles, name):.3f}"


def format_histograms(results: Sequence[StrategyResult], bins: int = HISTOGRAM_BINS) -> str:
    """Per strategy, how many accelerators sit in each utilisation decile."""
    edges = [f"{100 * index // bins}%" for index in range(bins)]
    rows = [["utilisation from", *edges]]
    rows += [[result.strategy, *map(str, result.utilisation_histogram(bins))] for result in results]
    return format_columns(rows)
