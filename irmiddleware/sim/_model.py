"""What the simulator simulates: the fleet, the requests, when they arrive, and when machines fail.

Units: time in seconds. A request's *work* is measured in seconds on a reference accelerator
(speed 1) running it alone (batch of 1). An accelerator of speed `s` running `b` requests at once
advances every one of them at `s / (1 + batch_slowdown * (b - 1))` work-seconds per second: that is
continuous batching, where each decode step produces one token for every sequence in the batch and a
step gets slower as the batch grows. Prefill is modelled the same way (chunked prefill mixed into the
steps), so a request's first token comes after its prefill work and its end after prefill + decode.

Everything random draws from a `random.Random` the caller seeds, so a scenario replays exactly.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

# How many draws estimate a workload's mean work (for turning an offered load into a rate). Fixed
# and seeded apart from the scenario, so the same workload always gets the same rate.
_MEAN_SAMPLES = 20_000


# ---- fleet -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fleet:
    """Accelerators by index: `speeds[i]` (1.0 = reference), `capacities[i]` (cost units in flight,
    e.g. a server's maximum batch), and how much one more sequence slows a batch step."""

    speeds: tuple[float, ...]
    capacities: tuple[int, ...]
    batch_slowdown: float = 0.05

    def __post_init__(self) -> None:
        if not self.speeds or len(self.speeds) != len(self.capacities):
            raise ValueError("a fleet needs one speed and one capacity per accelerator (at least one)")
        if min(self.speeds) <= 0 or min(self.capacities) < 1:
            raise ValueError("speeds must be > 0 and capacities >= 1")
        if self.batch_slowdown < 0:
            raise ValueError("batch_slowdown must be >= 0")

    def __len__(self) -> int:
        return len(self.speeds)

    def service_rate(self, index: int, running: int) -> float:
        """Work-seconds per second that each of `running` requests on accelerator `index` gets."""
        return self.speeds[index] / (1.0 + self.batch_slowdown * (running - 1))

    def peak_throughput(self) -> float:
        """Work-seconds per second the whole fleet completes when every batch is full."""
        return sum(cap * self.service_rate(i, cap) for i, cap in enumerate(self.capacities))


def make_fleet(
    count: int,
    *,
    heterogeneity: float = 0.0,
    capacity: int = 32,
    capacity_follows_speed: bool = True,
    batch_slowdown: float = 0.05,
    seed: int = 0,
) -> Fleet:
    """`count` accelerators whose speeds are log-uniform in [1/(1+h), 1+h] for heterogeneity h
    (0: identical; 1: a 4x spread, like mixing two GPU generations). With `capacity_follows_speed`
    a faster accelerator also holds proportionally more requests (more memory for KV cache)."""
    if count < 1:
        raise ValueError("a fleet needs at least one accelerator")
    if heterogeneity < 0:
        raise ValueError("heterogeneity must be >= 0")
    rng = random.Random(f"{seed}/fleet")
    spread = math.log1p(heterogeneity)
    speeds = tuple(math.exp(spread * rng.uniform(-1.0, 1.0)) for _ in range(count))
    if capacity_follows_speed:
        capacities = tuple(max(1, round(capacity * speed)) for speed in speeds)
    else:
        capacities = (capacity,) * count
    return Fleet(speeds, capacities, batch_slowdown)


# ---- requests ----------------------------------------------------------------------------------


class Job(NamedTuple):
    """One request as the fleet sees it: token counts (0 when not an LLM request), work before the
    first token and after it (seconds at speed 1, batch 1), and the cost it reserves."""

    prompt_tokens: int
    output_tokens: int
    prefill_s: float
    decode_s: float
    cost: int


class Workload(Protocol):
    """Draws jobs. `streams_tokens` says whether time to first token means anything."""

    @property
    def name(self) -> str: ...

    @property
    def streams_tokens(self) -> bool: ...

    def draw(self, rng: random.Random, prompt_tokens: int | None, output_tokens: int | None) -> Job:
        """A job; token counts given by a trace are used as they are, missing ones are drawn."""
        ...


@dataclass(frozen=True, slots=True)
class UniformWorkload:
    """Short-tailed requests: work uniform in mean·[1-spread, 1+spread], cost 1 each."""

    mean_s: float = 1.0
    spread: float = 0.5

    @property
    def name(self) -> str:
        return "uniform"

    @property
    def streams_tokens(self) -> bool:
        return False

    def draw(self, rng: random.Random, prompt_tokens: int | None, output_tokens: int | None) -> Job:
        work = self.mean_s * (1.0 + self.spread * (2.0 * rng.random() - 1.0))
        return Job(0, 0, 0.0, work, 1)


@dataclass(frozen=True, slots=True)
class LlmWorkload:
    """LLM-like requests: prompt and output lengths log-normal (heavy right tail), clipped to the
    context; prefill work ∝ prompt tokens, decode work ∝ output tokens; each request reserves
    `cost` units (one sequence slot of the batch by default)."""

    prompt_median: float = 512
    prompt_sigma: float = 1.0
    prompt_max: int = 8192
    output_median: float = 128
    output_sigma: float = 1.0
    output_max: int = 2048
    prefill_s_per_token: float = 0.00025
    decode_s_per_token: float = 0.02
    cost: int = 1

    @property
    def name(self) -> str:
        return "llm"

    @property
    def streams_tokens(self) -> bool:
        return True

    def draw(self, rng: random.Random, prompt_tokens: int | None, output_tokens: int | None) -> Job:
        if prompt_tokens is None:
            prompt_tokens = _lognormal_tokens(rng, self.prompt_median, self.prompt_sigma, self.prompt_max)
        if output_tokens is None:
            output_tokens = _lognormal_tokens(rng, self.output_median, self.output_sigma, self.output_max)
        prefill = prompt_tokens * self.prefill_s_per_token
        decode = output_tokens * self.decode_s_per_token
        return Job(prompt_tokens, output_tokens, prefill, decode, self.cost)


def _lognormal_tokens(rng: random.Random, median: float, sigma: float, maximum: int) -> int:
    return min(maximum, max(1, round(rng.lognormvariate(math.log(median), sigma))))


def mean_work_s(workload: Workload) -> float:
    """Mean work per request (Monte Carlo with a fixed seed: clipping has no closed form)."""
    rng = random.Random("mean-work")
    total = 0.0
    for _ in range(_MEAN_SAMPLES):
        job = workload.draw(rng, None, None)
        total += job.prefill_s + job.decode_s
    return total / _MEAN_SAMPLES


def offered_rate(fleet: Fleet, workload: Workload, load: float) -> float:
    """Arrivals per second that keep the fleet `load` busy (1.0 = every batch full on average)."""
    if load <= 0:
        raise ValueError("load must be > 0")
    return load * fleet.peak_throughput() / mean_work_s(workload)


# ---- arrivals ----------------------------------------------------------------------------------


class Arrival(NamedTuple):
    """When a request arrives, with token counts when a trace gives them."""

    time_s: float
    prompt_tokens: int | None = None
    output_tokens: int | None = None


class ArrivalProcess(Protocol):
    @property
    def name(self) -> str: ...

    def arrivals(self, rng: random.Random) -> Iterator[Arrival]:
        """Arrivals in time order; may be endless (the simulation takes as many as it needs)."""
        ...


@dataclass(frozen=True, slots=True)
class PoissonArrivals:
    """Independent arrivals at a constant mean rate."""

    rate_per_s: float

    @property
    def name(self) -> str:
        return "poisson"

    def arrivals(self, rng: random.Random) -> Iterator[Arrival]:
        if self.rate_per_s <= 0:
            raise ValueError("rate_per_s must be > 0")
        time_s = 0.0
        while True:
            time_s += rng.expovariate(self.rate_per_s)
            yield Arrival(time_s)


@dataclass(frozen=True, slots=True)
class BurstyArrivals:
    """Poisson arrivals whose rate switches between calm and bursts (`burst_factor` times the calm
    rate) for exponentially long spells; bursts take `burst_fraction` of the time on average and a
    calm spell plus a burst last `period_s` on average. The long-run mean rate is `rate_per_s`."""

    rate_per_s: float
    burst_factor: float = 4.0
    burst_fraction: float = 0.2
    period_s: float = 20.0

    @property
    def name(self) -> str:
        return "bursty"

    def arrivals(self, rng: random.Random) -> Iterator[Arrival]:
        if self.rate_per_s <= 0 or self.burst_factor < 1 or not 0 < self.burst_fraction < 1:
            raise ValueError("need rate_per_s > 0, burst_factor >= 1 and 0 < burst_fraction < 1")
        calm_rate = self.rate_per_s / (1 + self.burst_fraction * (self.burst_factor - 1))
        spells = {False: self.period_s * (1 - self.burst_fraction), True: self.period_s * self.burst_fraction}
        bursting = False
        time_s = 0.0
        spell_end_s = rng.expovariate(1 / spells[bursting])
        while True:
            rate = calm_rate * (self.burst_factor if bursting else 1.0)
            next_s = time_s + rng.expovariate(rate)
            if next_s >= spell_end_s:
                # Memoryless: restarting the draw at the switch keeps each spell a Poisson process.
                time_s, bursting = spell_end_s, not bursting
                spell_end_s = time_s + rng.expovariate(1 / spells[bursting])
                continue
            time_s = next_s
            yield Arrival(time_s)


@dataclass(frozen=True, slots=True)
class ReplayArrivals:
    """Arrivals given in code, e.g. a recorded or hand-made sequence (times non-decreasing)."""

    items: tuple[Arrival, ...]

    @property
    def name(self) -> str:
        return "replay"

    def arrivals(self, rng: random.Random) -> Iterator[Arrival]:
        previous_s = -math.inf
        for arrival in self.items:
            if arrival.time_s < previous_s:
                raise ValueError(f"arrival times go backwards at {arrival}")
            previous_s = arrival.time_s
            yield arrival


@dataclass(frozen=True, slots=True)
class TraceArrivals:
    """Arrivals replayed from a file: CSV with a header, or JSON Lines (one object per line), with
    `time` (seconds; made relative to the first row) and optionally `prompt_tokens` and
    `output_tokens` (drawn from the workload when absent). Rows must be in time order."""

    path: Path

    @property
    def name(self) -> str:
        return "trace"

    def arrivals(self, rng: random.Random) -> Iterator[Arrival]:
        start_s: float | None = None
        previous_s = -math.inf
        for line, row in self._rows():
            try:
                arrival = _arrival_of(row)
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{self.path}:{line}: bad row {row!r}: {error}") from None
            if arrival.time_s < previous_s:
                raise ValueError(f"{self.path}:{line}: time goes backwards ({arrival.time_s} < {previous_s})")
            previous_s = arrival.time_s
            if start_s is None:
                start_s = arrival.time_s
            yield arrival._replace(time_s=arrival.time_s - start_s)

    def _rows(self) -> Iterator[tuple[int, dict[str, object]]]:
        with self.path.open(newline="") as file:
            if self.path.suffix in (".jsonl", ".ndjson", ".json"):
                for line, text in enumerate(file, start=1):
                    if text.strip():
                        yield line, json.loads(text)
            else:
                for line, row in enumerate(csv.DictReader(file), start=2):
                    yield line, dict(row)


def _arrival_of(row: dict[str, object]) -> Arrival:
    time_s = _number(row["time"])
    if not math.isfinite(time_s):
        raise ValueError("time must be finite")
    return Arrival(time_s, _tokens(row.get("prompt_tokens")), _tokens(row.get("output_tokens")))


def _number(value: object) -> float:
    # CSV gives strings, JSON numbers; anything else (a list, a bool) is a mistake in the trace.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _tokens(value: object) -> int | None:
    if value is None or value == "":
        return None
    tokens = _number(value)
    if tokens < 0 or tokens != int(tokens):
        raise ValueError("token counts must be whole numbers >= 0")
    return max(1, int(tokens))


# ---- failures ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Failure:
    """Accelerator `accelerator` (an index into the fleet) goes down at `down_s` and comes back at
    `up_s` (never, if None)."""

    accelerator: int
    down_s: float
    up_s: float | None = None

    def __post_init__(self) -> None:
        if self.down_s < 0 or (self.up_s is not None and self.up_s <= self.down_s):
            raise ValueError(f"a failure needs 0 <= down_s < up_s, got {self.down_s}..{self.up_s}")

    @classmethod
    def parse(cls, text: str) -> Failure:
        """`INDEX:DOWN[:UP]`, e.g. `3:10:25` (accelerator 3 down from t=10 s to t=25 s)."""
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"expected INDEX:DOWN[:UP], got {text!r}")
        up_s = float(parts[2]) if len(parts) == 3 else None
        return cls(int(parts[0]), float(parts[1]), up_s)


@dataclass(frozen=True, slots=True)
class SpeedChange:
    """Accelerator `accelerator` runs `factor` times slower from `from_s` until `until_s` (to the
    end, if None): a noisy neighbour, thermal throttling. Its work in progress slows with it."""

    accelerator: int
    from_s: float
    until_s: float | None = None
    factor: float = 2.0

    def __post_init__(self) -> None:
        if self.from_s < 0 or (self.until_s is not None and self.until_s <= self.from_s):
            raise ValueError(f"a speed change needs 0 <= from_s < until_s, got {self.from_s}..{self.until_s}")
        if not self.factor > 0:
            raise ValueError(f"a speed change's factor must be > 0, got {self.factor}")

    @classmethod
    def parse(cls, text: str) -> SpeedChange:
        """`INDEX:FROM[:UNTIL[:FACTOR]]`, e.g. `2:60:120:2` (accelerator 2 twice as slow from
        t=60 s to t=120 s); an empty UNTIL means to the end."""
        parts = text.split(":")
        if not 2 <= len(parts) <= 4:
            raise ValueError(f"expected INDEX:FROM[:UNTIL[:FACTOR]], got {text!r}")
        until_s = float(parts[2]) if len(parts) > 2 and parts[2] else None
        factor = float(parts[3]) if len(parts) > 3 else 2.0
        return cls(int(parts[0]), float(parts[1]), until_s, factor)
