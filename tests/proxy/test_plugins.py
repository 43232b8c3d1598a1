"""Plugins: the built-ins and the example third-party plugin (plugins/example-strategy, installed
in the test environment) come in through the `irmiddleware` entry points; the example strategy is
selected by name from config; a strategy that raises, returns a foreign id or refuses falls back or
answers 503 without leaking load; broken and clashing plugins are reported by name; observers see
each request's lifecycle and cannot break it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import httpx
import pytest
from proxy_support import Emulators, Routers, config_for

from irmiddleware import _plugins
from irmiddleware.hooks import BackendLoad, PythonStrategy, RequestEvent, RouteInfo, Strategy, hookimpl
from irmiddleware.proxy import BackendConfig, RouterConfig, create_app
from irmiddleware.testing import assert_idle

BODY = {"model": "m", "prompt": "Hi", "max_tokens": 2}


class StrategyPlugin:
    """A plugin object offering one Python strategy named "custom"."""

    __name__ = "custom-plugin"  # what pluggy reports as the plugin's name

    def __init__(self, pick: Callable[[Sequence[BackendLoad], RouteInfo], int | None]) -> None:
        self._pick = pick

    @hookimpl
    def irm_strategies(self) -> Sequence[Strategy]:
        return [PythonStrategy("custom", self._pick)]


def test_builtins_and_example_plugin_come_from_entry_points() -> None:
    manager, broken = _plugins.load_plugins()
    registry = _plugins.collect(manager, broken)
    assert {"p2c", "round_robin", "least_connections", "least_latency"} <= set(registry.strategies)
    assert registry.strategies["least_latency"][1] == "least_latency"  # the example's entry point
    assert registry.strategies["p2c"][1] == "strategies"
    assert {"vllm", "openai"} <= set(registry.adapters)


def test_example_strategy_chosen_by_name_from_config(emulators: Emulators, router: Routers) -> None:
    backends = emulators(2)
    server = router(config_for([b.url for b in backends], strategy="least_latency"))
    for _ in range(8):
        assert httpx.post(f"{server.url}/v1/completions", json=BODY).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'irm_routing_decisions_total{result="routed",strategy="least_latency"} 8.0' in metrics
    assert httpx.get(f"{server.url}/irm/status").json()["strategy"] == "least_latency"
    assert_idle(server.app.router)


def _raise(backends: Sequence[BackendLoad], request: RouteInfo) -> int | None:
    raise RuntimeError("strategy bug")


@pytest.mark.parametrize(
    "pick",
    [_raise, lambda backends, request: 12345, lambda backends, request: "not-an-id"],
    ids=["raises", "foreign", "junk"],
)
def test_faulty_strategy_falls_back_without_leaking(
    emulators: Emulators, router: Routers, caplog: pytest.LogCaptureFixture, pick: Callable[..., int | None]
) -> None:
    (backend,) = emulators(1)
    server = router(config_for([backend.url], strategy="custom"), plugins=(StrategyPlugin(pick),))
    with caplog.at_level(logging.ERROR, logger="irmiddleware.proxy"):
        for _ in range(3):
            assert httpx.post(f"{server.url}/v1/completions", json=BODY).status_code == 200
    assert "custom-plugin" in caplog.text and "fallback" in caplog.text
    assert 'result="fallback",strategy="custom"} 3.0' in httpx.get(f"{server.url}/metrics").text
    assert_idle(server.app.router)


def test_strategy_returning_none_means_nothing_fits(emulators: Emulators, router: Routers) -> None:
    (backend,) = emulators(1)
    server = router(
        config_for([backend.url], strategy="custom"), plugins=(StrategyPlugin(lambda b, r: None),)
    )
    response = httpx.post(f"{server.url}/v1/completions", json=BODY)
    assert response.status_code == 503 and "retry-after" in response.headers
    assert backend.emulator.stats.received == 0
    assert_idle(server.app.router)


class BrokenPlugin:
    __name__ = "broken-plugin"

    @hookimpl
    def irm_strategies(self) -> Sequence[Strategy]:
        raise ImportError("missing dependency")


def test_broken_plugin_is_reported_by_name(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="irmiddleware.plugins"):
        manager, broken = _plugins.load_plugins(BrokenPlugin())
        registry = _plugins.collect(manager, broken)
    assert "broken-plugin" in caplog.text
    assert "p2c" in registry.strategies  # the others still load
    with pytest.raises(_plugins.PluginError, match=r"unknown strategy 'gone'.*p2c.*broken-plugin"):
        registry.strategy("gone")


def test_clashing_names_and_unknown_names_are_config_errors(emulators: Emulators) -> None:
    (backend,) = emulators(1)
    clash = StrategyPlugin(_raise)
    other = StrategyPlugin(_raise)
    other.__name__ = "other-plugin"  # type: ignore[misc]
    with pytest.raises(
        _plugins.PluginError, match="'custom' is registered by both 'custom-plugin' and 'other-plugin'"
    ):
        create_app(config_for([backend.url]), plugins=(clash, other))
    with pytest.raises(
        _plugins.PluginError, match=r"unknown strategy 'fastest'; available: .*least_connections"
    ):
        create_app(config_for([backend.url], strategy="fastest"))
    tgi = RouterConfig(backends=(BackendConfig(url=backend.url, type="sglang"),))
    with pytest.raises(_plugins.PluginError, match=r"unknown backend type 'sglang'; available: .*vllm"):
        create_app(tgi)


class Recorder:
    __name__ = "recorder"

    def __init__(self) -> None:
        self.events: list[tuple[str, RequestEvent]] = []

    @hookimpl
    def irm_request_routed(self, event: RequestEvent) -> None:
        self.events.append(("routed", event))

    @hookimpl
    def irm_request_first_byte(self, event: RequestEvent) -> None:
        self.events.append(("first_byte", event))

    @hookimpl
    def irm_request_completed(self, event: RequestEvent) -> None:
        self.events.append(("completed", event))

    @hookimpl
    def irm_request_failed(self, event: RequestEvent) -> None:
        self.events.append(("failed", event))


class RaisingObserver:
    __name__ = "raising-observer"

    @hookimpl
    def irm_request_completed(self, event: RequestEvent) -> None:
        raise RuntimeError("observer bug")


def test_observers_see_the_lifecycle_and_cannot_break_it(emulators: Emulators, router: Routers) -> None:
    (backend,) = emulators(1)
    recorder = Recorder()
    server = router(config_for([backend.url]), plugins=(recorder, RaisingObserver()))
    assert httpx.post(f"{server.url}/v1/completions", json=BODY).status_code == 200
    # "completed" fires after the last byte went out, so the client may see the answer first.
    deadline = time.monotonic() + 5
    while len(recorder.events) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [name for name, _event in recorder.events] == ["routed", "first_byte", "completed"]
    completed = recorder.events[-1][1]
    assert (completed.model, completed.backend_url, completed.status, completed.attempt) == (
        "m",
        backend.url,
        200,
        1,
    )
    assert_idle(server.app.router)
