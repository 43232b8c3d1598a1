"""The README's Python examples run as written (the quick start, the drop-in middleware against an
emulated backend on 127.0.0.1, the strategy plugin), so the README cannot drift from the code."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from irmiddleware import Router
from irmiddleware.hooks import BackendLoad, RouteInfo

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_its_examples() -> None:
    assert len(BLOCKS) == 3, "quick start, drop-in middleware, strategy plugin"


@pytest.mark.parametrize("block", BLOCKS, ids=["quick_start", "middleware", "strategy_plugin"])
def test_readme_example_runs(block: str) -> None:
    namespace: dict[str, object] = {"__name__": "readme_example"}
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(block, str(README), "exec"), namespace)
    for value in namespace.values():  # the seed's quick start never closes its router (the seed had no close)
        if isinstance(value, Router):
            value.close()
    printed = output.getvalue()
    if "Routed to accelerator" in block:
        assert re.search(r"^Routed to accelerator [12]$", printed, re.M), printed
    elif "RoutingMiddleware" in block:
        lines = printed.splitlines()
        assert lines[0] == "{'hello': 'world'}"
        assert len(lines) == 2 and lines[1].strip(), printed  # the emulated backend's completion
    else:
        (strategy,) = namespace["irm_strategies"]()  # type: ignore[operator]
        assert strategy.name == "least_latency"

        def backend(id: int, state: str, load: int, latency_s: float) -> BackendLoad:
            return BackendLoad(
                id, f"http://127.0.0.1:{9000 + id}", state, 10, 1.0, load, load, latency_s, 0, 0
            )

        request = RouteInfo("/v1/completions", "m", cost=2)
        pool = [backend(0, "active", 3, 0.9), backend(1, "active", 9, 0.1), backend(2, "down", 0, 0.01)]
        assert strategy.pick(pool, request) == 0  # 1 is faster but full for cost 2; 2 is down
        assert strategy.pick(pool[1:], request) is None
