"""Balls into bins: the theory behind power-of-two-choices, reproduced through the native core.

Throw n balls into n bins. Placing each ball in a uniformly random bin gives a fullest bin of about
ln n / ln ln n balls (Gonnet 1981; Raab & Steger 1998); letting each ball look at two random bins and
take the emptier gives ln ln n / ln 2 + O(1) (Azar, Broder, Karlin & Upfal 1994) - an exponential
improvement from one extra look. The `p2c` strategy is that second process.

Every placement is a reservation in the native core on accelerators whose capacity (2**24) no bin
can reach, so nothing is ever refused and the core's relative-load key equals the ball count exactly.
- two choices: `Router("p2c").acquire(1)`, the real strategy. It samples two *distinct* bins and
  breaks ties towards the lower slot; both are allowed by the theorem (Vöcking 1999 shows a fixed
  tie-break is, if anything, better).
- one choice: the core has no purely random strategy, so the bin is drawn in Python with the seeded
  `random.Random` and reserved with `Router.acquire_on(bin, 1)`.
The fullest bin is read back from the core's load counters (`Router.stats()`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from irmiddleware._router import Accelerator, Router
from irmiddleware.sim._stats import format_columns

# Bigger than any bin gets: the core then never refuses, and load / capacity keys stay exact.
_BIN_CAPACITY: Final = 1 << 24
DEFAULT_SIZES: Final = (1_000, 10_000, 100_000)


@dataclass(frozen=True, slots=True)
class BallsIntoBins:
    """The fullest bin after n balls into n bins, with each rule, next to its asymptotic bound."""

    n: int
    one_choice_max: int
    two_choices_max: int

    @property
    def one_choice_bound(self) -> float:
        """ln n / ln ln n."""
        return math.log(self.n) / math.log(math.log(self.n))

    @property
    def two_choices_bound(self) -> float:
        """ln ln n / ln 2 (the O(1) term left out)."""
        return math.log(math.log(self.n)) / math.log(2)


def max_load_one_choice(n: int, seed: int = 0) -> int:
    """n balls, each into a bin drawn uniformly at random (in Python; reserved in the core)."""
    rng = random.Random(f"{seed}/one-choice")
    with _bins(n, "round_robin", seed) as router:
        for _ in range(n):
            if router.acquire_on(rng.randrange(n), 1) is None:
                raise RuntimeError("a bin refused a ball; its capacity must exceed n")
        return _max_load(router)


def max_load_two_choices(n: int, seed: int = 0) -> int:
    """n balls placed by the native `p2c` strategy (two random bins, the emptier one wins)."""
    with _bins(n, "p2c", seed) as router:
        for _ in range(n):
            if router.acquire(1) is None:
                raise RuntimeError("p2c refused a ball; bin capacity must exceed n")
        return _max_load(router)


def balls_into_bins(sizes: Iterable[int] = DEFAULT_SIZES, seed: int = 0) -> list[BallsIntoBins]:
    """Both rules at each n, from the same seed."""
    return [BallsIntoBins(n, max_load_one_choice(n, seed), max_load_two_choices(n, seed)) for n in sizes]


def _bins(n: int, strategy: str, seed: int) -> Router:
    if not 3 <= n < _BIN_CAPACITY:
        raise ValueError(f"n must be in 3..{_BIN_CAPACITY - 1} (ln ln n must be positive)")
    router = Router(strategy, max_accelerators=n, seed=seed)
    for index in range(n):
        router.add_accelerator(Accelerator(index, _BIN_CAPACITY))
    return router


def _max_load(router: Router) -> int:
    # Leases are dropped unreleased on purpose: the router (and its table) is closed right after.
    return max(stats.load for stats in router.stats())


def format_balls_into_bins(results: Iterable[BallsIntoBins]) -> str:
    header: tuple[str, ...] = ("n", "one choice max", "ln n/ln ln n", "two choices max", "ln ln n/ln 2")
    rows: list[tuple[str, ...]] = [header] + [
        (
            f"{result.n:,}",
            str(result.one_choice_max),
            f"{result.one_choice_bound:.2f}",
            str(result.two_choices_max),
            f"{result.two_choices_bound:.2f}",
        )
        for result in results
    ]
    return format_columns(rows)
