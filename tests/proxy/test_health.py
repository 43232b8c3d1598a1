"""Active health checks against real vLLM emulators: a backend slow to start (connections refused
while it "loads") gets no traffic before its first passing check when `require_ready` is set; a
backend whose `/health` fails is taken out after `unhealthy_threshold` checks and brought back after
`healthy_threshold`, with the change logged, exported as metrics and sent to the
`irm_backend_state_changed` hook; a plugin's `irm_health_probe` replaces the adapter's check (and
one that raises leaves the adapter's in place, or the next plugin's: plugins are asked in pluggy's
order, `tryfirst` first); the checks stop cleanly at shutdown; and after each
test nothing is left in flight."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from proxy_support import (
    FAST_FLEET,
    Emulators,
    Routers,
    RouterServer,
    backend_status,
    config_for,
    wait_idle,
)

from irmiddleware.hooks import BackendInfo, HealthProbe, hookimpl
from irmiddleware.proxy import create_app
from irmiddleware.testing import assert_idle, wait_until

BODY = {"model": "m", "prompt": "Hi", "max_tokens": 2}


def _fleet(**health: Any) -> dict[str, Any]:
    return {**FAST_FLEET, "health": {**FAST_FLEET["health"], **health}}


def _metric(server: RouterServer, line_start: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class StateRecorder:
    def __init__(self) -> None:
        self.changes: list[tuple[str, str, str, str]] = []

    @hookimpl
    def irm_backend_state_changed(self, backend: BackendInfo, old: str, new: str, reason: str) -> None:
        self.changes.append((backend.url, old, new, reason))


@pytest.mark.slow
def test_slow_starter_gets_nothing_before_it_is_ready(emulators: Emulators, router: Routers) -> None:
    (ready,) = emulators(1)
    (loading,) = emulators(1, startup_delay_s=0.6)  # port bound, connections refused meanwhile
    config = config_for([ready.url, loading.url], strategy="round_robin", **_fleet(require_ready=True))
    server = router(config)
    assert backend_status(server, loading.url)["state"] == "down"
    sent_early = 0
    while not loading.server.started and sent_early < 200:
        assert httpx.post(f"{server.url}/v1/completions", json=BODY).status_code == 200
        sent_early += 1
    # Not one attempt went to the loading backend before it listened: every attempt routed there
    # arrived (none was refused and retried). Usually none went at all; the health checks may
    # pass a moment before `started` flips, so a few may have arrived, which is correct.
    assert backend_status(server, loading.url)["routed"] == loading.emulator.stats.received
    assert _metric(server, 'irm_routing_decisions_total{result="retry"') == 0.0
    wait_until(lambda: backend_status(server, loading.url)["state"] == "active", "ready after loading")
    for _ in range(6):
        assert httpx.post(f"{server.url}/v1/completions", json=BODY).status_code == 200
    assert loading.emulator.stats.received >= 2  # round robin now includes it
    wait_idle(server.app)
    assert_idle(server.app.router)


@pytest.mark.slow
def test_failing_health_takes_a_backend_out_and_back(emulators: Emulators) -> None:
    sick, well = emulators(2)
    recorder = StateRecorder()
    app = create_app(config_for([sick.url, well.url], **_fleet()), plugins=(recorder,))
    with RouterServer(app) as server:
        sick.emulator.reconfigure(unhealthy=True)
        wait_until(lambda: backend_status(server, sick.url)["state"] == "down", "down after failed checks")
        status = backend_status(server, sick.url)
        assert status["healthy"] is False and status["ejected"] is False
        assert _metric(server, f'irm_backend_healthy{{backend="{sick.url}"}}') == 0.0
        received = sick.emulator.stats.received
        for _ in range(10):
            assert httpx.post(f"{server.url}/v1/completions", json=BODY).status_code == 200
        assert sick.emulator.stats.received == received  # nothing new while down

        sick.emulator.reconfigure(unhealthy=False)
        wait_until(lambda: backend_status(server, sick.url)["state"] == "active", "back after passing checks")
        transitions = f'irm_backend_state_transitions_total{{backend="{sick.url}",state="down"}}'
        assert _metric(server, transitions) == 1.0
        assert (sick.url, "active", "down", "health checks failed") in recorder.changes
        assert (sick.url, "down", "active", "healthy") in recorder.changes
        wait_idle(server.app)
        assert_idle(server.app.router)
    assert app.monitor._tasks == []  # cancelled and awaited at lifespan shutdown


def test_router_answers_fleet_health_itself(emulators: Emulators, router: Routers) -> None:
    """TGI and Triton clients ask the router whether it is ready; vLLM's path is not routed: the
    router's own liveness probe answers it, or, with the probes off, the app behind (404)."""
    (backend,) = emulators(1)
    server = router(config_for([backend.url], **_fleet()))
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # the liveness probe
    unprobed = router(config_for([backend.url], **_fleet(), probes={"enabled": False}))
    assert httpx.get(f"{unprobed.url}/health").status_code == 404  # vLLM adapter: not a routed path
    assert backend_status(server, backend.url)["healthy"] is True
    wait_idle(server.app)
    assert_idle(server.app.router)


class ModelsProbe:
    """Checks vLLM backends on `/v1/models` instead of `/health` (a plugin's `irm_health_probe`)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    @hookimpl
    def irm_health_probe(self, backend: BackendInfo, adapter: object) -> HealthProbe | None:
        self.asked.append(backend.url)
        return HealthProbe("/v1/models", ok_statuses=frozenset({200}), timeout_s=1.0)


class BrokenProbe:
    @hookimpl
    def irm_health_probe(self, backend: BackendInfo, adapter: object) -> HealthProbe | None:
        raise RuntimeError("probe plugin bug")


def _assert_checked_on_models_path(server: RouterServer, url: str) -> None:
    """The backend at `url` stays active while its `/health` fails: it is checked elsewhere."""
    checks = 'irm_health_checks_total{backend="' + url + '",result="pass"}'
    passed = _metric(server, checks)
    wait_until(lambda: _metric(server, checks) >= passed + 4, "four more passing checks")
    assert backend_status(server, url)["state"] == "active"
    assert httpx.post(f"{server.url}/v1/completions", json=BODY).status_code == 200
    wait_idle(server.app)
    assert_idle(server.app.router)


def test_a_plugins_health_probe_replaces_the_adapters(emulators: Emulators) -> None:
    (backend,) = emulators(1)
    probe = ModelsProbe()
    app = create_app(config_for([backend.url], **_fleet()), plugins=(probe,))
    with RouterServer(app) as server:
        assert probe.asked == [backend.url]
        backend.emulator.reconfigure(unhealthy=True)  # /health answers 503; /v1/models still 200
        _assert_checked_on_models_path(server, backend.url)


class AskedProbe:
    """Records that it was asked, then raises (`answer` None) or answers a probe of `answer`."""

    def __init__(self, name: str, asked: list[str], answer: str | None) -> None:
        self.__name__, self._asked, self._answer = name, asked, answer

    def _ask(self) -> HealthProbe | None:
        self._asked.append(self.__name__)
        if self._answer is None:
            raise RuntimeError("probe plugin bug")
        return HealthProbe(self._answer, ok_statuses=frozenset({200}), timeout_s=1.0)


class AskedFirst(AskedProbe):
    @hookimpl(tryfirst=True)
    def irm_health_probe(self) -> HealthProbe | None:
        return self._ask()


class AskedPlain(AskedProbe):
    @hookimpl
    def irm_health_probe(self, backend: BackendInfo) -> HealthProbe | None:
        return self._ask()


class AskedLast(AskedProbe):
    @hookimpl(trylast=True)
    def irm_health_probe(self, adapter: object) -> HealthProbe | None:
        return self._ask()


def test_health_probe_plugins_are_asked_in_pluggy_order_past_one_that_raises(
    emulators: Emulators, caplog: pytest.LogCaptureFixture
) -> None:
    (backend,) = emulators(1)
    asked: list[str] = []
    # tryfirst registered first and trylast last (registration order alone would reverse them);
    # the tryfirst one raises, and the next one's answer wins: the trylast one is never asked.
    plugins = (
        AskedFirst("raising", asked, None),
        AskedPlain("models", asked, "/v1/models"),
        AskedLast("late", asked, "/nowhere"),
    )
    with caplog.at_level(logging.WARNING, logger="irmiddleware.plugins"):
        app = create_app(config_for([backend.url], **_fleet()), plugins=plugins)
    with RouterServer(app) as server:
        assert asked == ["raising", "models"]
        assert "'raising' raised in irm_health_probe" in caplog.text
        backend.emulator.reconfigure(unhealthy=True)  # /health answers 503; /v1/models still 200
        _assert_checked_on_models_path(server, backend.url)


def test_a_raising_health_probe_plugin_falls_back_to_the_adapters_path(emulators: Emulators) -> None:
    (backend,) = emulators(1)
    app = create_app(config_for([backend.url], **_fleet()), plugins=(BrokenProbe(),))
    with RouterServer(app) as server:
        backend.emulator.reconfigure(unhealthy=True)  # the adapter's /health: taken out
        wait_until(lambda: backend_status(server, backend.url)["state"] == "down", "down on /health")
        wait_idle(server.app)
        assert_idle(server.app.router)
