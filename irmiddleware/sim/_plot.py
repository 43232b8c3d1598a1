"""The comparison as a picture: latency (and time-to-first-token) tails, and each strategy's
utilisation across accelerators. matplotlib is an optional extra (`irmiddleware[plot]`), imported
only here and only when a plot is asked for."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from irmiddleware.sim._stats import StrategyResult

# Enough points for a smooth curve; plotting a million points per line would only cost time.
_CDF_POINTS = 2_000


def plot_comparison(results: Sequence[StrategyResult], path: Path, *, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # Files only: no display needed, none wanted.
    import matplotlib.pyplot as plt

    with_ttft = any(len(result.ttfts_s) for result in results)
    panels = 3 if with_ttft else 2
    figure, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), constrained_layout=True)
    _tail_panel(axes[0], results, "latency", "end-to-end latency (s)")
    if with_ttft:
        _tail_panel(axes[1], results, "ttft", "time to first token (s)")
    _utilisation_panel(axes[-1], results)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _tail_panel(axis: object, results: Sequence[StrategyResult], which: str, label: str) -> None:
    # The complementary CDF on log-log axes: the tail (p99 and beyond) is where strategies differ,
    # and a plain CDF squeezes it into the top pixel.
    for result in results:
        values = result.latencies_s if which == "latency" else result.ttfts_s
        count = len(values)
        if not count:
            continue
        step = max(1, count // _CDF_POINTS)
        indices = [*range(0, count - 1, step), count - 1]
        xs = [values[index] for index in indices]
        ys = [max(1 - (index + 1) / count, 0.5 / count) for index in indices]
        axis.plot(xs, ys, label=result.strategy)  # type: ignore[attr-defined]
    axis.set_xscale("log")  # type: ignore[attr-defined]
    axis.set_yscale("log")  # type: ignore[attr-defined]
    axis.set_xlabel(label)  # type: ignore[attr-defined]
    axis.set_ylabel("fraction of requests slower")  # type: ignore[attr-defined]
    axis.grid(True, which="both", alpha=0.3)  # type: ignore[attr-defined]
    axis.legend()  # type: ignore[attr-defined]


def _utilisation_panel(axis: object, results: Sequence[StrategyResult]) -> None:
    # Sorted utilisation per accelerator: a flat line is a balanced fleet.
    for result in results:
        ordered = sorted(result.utilisation, reverse=True)
        axis.plot(range(len(ordered)), ordered, label=result.strategy)  # type: ignore[attr-defined]
    axis.set_xlabel("accelerators, busiest first")  # type: ignore[attr-defined]
    axis.set_ylabel("time-averaged utilisation")  # type: ignore[attr-defined]
    axis.set_ylim(0, 1.05)  # type: ignore[attr-defined]
    axis.grid(True, alpha=0.3)  # type: ignore[attr-defined]
    axis.legend()  # type: ignore[attr-defined]
