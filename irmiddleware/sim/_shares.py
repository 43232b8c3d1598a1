"""Share over time: which part of the requests admitted in each time window went to one accelerator,
per strategy. With a `SpeedChange` in the scenario it shows adaptation: a router that learns speed
moves share away from the slowed accelerator while it is slow, and back after it recovers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from irmiddleware.sim._stats import StrategyResult

__all__ = ["format_phases", "format_shares", "phase_shares", "plot_shares", "shares_over_time"]


def shares_over_time(result: StrategyResult, accelerator: int, window_s: float) -> list[tuple[float, float]]:
    """(window start, share of the window's admissions that went to `accelerator`) for every
    window of `window_s` from 0 to the last admission; a window without admissions has share 0."""
    if window_s <= 0:
        raise ValueError("window_s must be > 0")
    if not result.routed_s:
        return []
    windows = math.floor(result.routed_s[-1] / window_s) + 1
    totals = [0] * windows
    hits = [0] * windows
    for time_s, index in zip(result.routed_s, result.routed_to, strict=True):
        window = min(windows - 1, int(time_s // window_s))
        totals[window] += 1
        hits[window] += index == accelerator
    return [
        (window * window_s, hits[window] / totals[window] if totals[window] else 0.0)
        for window in range(windows)
    ]


def format_shares(
    results: Sequence[StrategyResult],
    accelerator: int,
    window_s: float,
    between_s: tuple[float, float] = (0.0, math.inf),
) -> str:
    """A table: one row per window starting in `between_s`, the share (%) of `accelerator` under
    each strategy."""
    columns = [shares_over_time(result, accelerator, window_s) for result in results]
    rows = max((len(column) for column in columns), default=0)
    header = [f"window start, s (accelerator {accelerator})", *(result.strategy for result in results)]
    lines = ["  ".join(f"{cell:>{len(cell) if i else 36}}" for i, cell in enumerate(header))]
    for row in range(rows):
        start = next(column[row][0] for column in columns if row < len(column))
        if not between_s[0] <= start < between_s[1]:
            continue
        cells = [f"{start:>36.0f}"]
        for result, column in zip(results, columns, strict=True):
            share = f"{100 * column[row][1]:.1f} %" if row < len(column) else "-"
            cells.append(f"{share:>{len(result.strategy)}}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def phase_shares(
    result: StrategyResult, accelerator: int, from_s: float, until_s: float, settle_s: float = 10.0
) -> list[tuple[str, float, int]]:
    """(phase, share of `accelerator`, admissions) around a slowdown from `from_s` to `until_s`:
    the same length before it, its first `settle_s`, the rest of it, the first `settle_s` after
    it, and the same length after that."""
    length = until_s - from_s
    phases = [
        ("before", from_s - length, from_s),
        (f"first {settle_s:g} s slow", from_s, from_s + settle_s),
        ("rest of slow", from_s + settle_s, until_s),
        (f"first {settle_s:g} s recovered", until_s, until_s + settle_s),
        ("after", until_s + settle_s, until_s + settle_s + length),
    ]
    rows = []
    for name, start, end in phases:
        total = hits = 0
        for time_s, index in zip(result.routed_s, result.routed_to, strict=True):
            if start <= time_s < end:
                total += 1
                hits += index == accelerator
        rows.append((name, hits / total if total else 0.0, total))
    return rows


def format_phases(results: Sequence[StrategyResult], accelerator: int, from_s: float, until_s: float) -> str:
    """`phase_shares` of each strategy, one row per phase: share % (admissions)."""
    columns = [phase_shares(result, accelerator, from_s, until_s) for result in results]
    width = max(len(result.strategy) for result in results) + 10
    lines = [
        f"{'phase (accelerator ' + str(accelerator) + ')':>28}"
        + "".join(f"{r.strategy:>{width}}" for r in results)
    ]
    for row, (name, _share, _total) in enumerate(columns[0]):
        cells = "".join(f"{f'{100 * c[row][1]:.1f} % ({c[row][2]})':>{width}}" for c in columns)
        lines.append(f"{name:>28}{cells}")
    return "\n".join(lines)


def plot_shares(
    results: Sequence[StrategyResult], accelerator: int, window_s: float, path: Path, title: str = ""
) -> None:
    """`shares_over_time` of each strategy as lines (matplotlib, an optional extra, imported here)."""
    import matplotlib

    matplotlib.use("Agg")  # Files only: no display needed, none wanted.
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3.6), constrained_layout=True)
    for result in results:
        points = shares_over_time(result, accelerator, window_s)
        axis.plot([start for start, _ in points], [100 * share for _, share in points], label=result.strategy)
    axis.set_xlabel("simulated time (s)")
    axis.set_ylabel(f"accelerator {accelerator}'s share (%)")
    axis.grid(True, alpha=0.3)
    axis.legend()
    if title:
        figure.suptitle(title, fontsize=9)
    figure.savefig(path, dpi=110)
    plt.close(figure)
