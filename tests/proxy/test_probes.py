"""The router's liveness and readiness probes (`[router.probes]`), with real vLLM emulators and
routers on 127.0.0.1 and health checks every 50 ms.

Liveness answers 200 whatever the fleet does; readiness follows the fleet: with `every_model`, it
turns 503 (naming the model) when every backend of one model is unhealthy or stopped, and back to
200 when one passes its checks again; with `any_backend`, one active backend of any model is
enough. Neither probe is ever proxied (the backends count no request), only GET and HEAD are
answered, a path an adapter routes stays the adapter's, and the probes can be switched off or
moved. Readiness turns 503 at `begin_shutdown` and at lifespan shutdown while routing goes on; for
`irmiddleware serve` at the first SIGTERM, while a stream in flight is allowed to finish and new
requests are still served during `shutdown_delay_s`. Bad `[router.probes]` values are one
`ConfigError` line each. The probe example of doc/proxy.md runs as written."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from proxy_support import FAST_FLEET, Emulators, Routers, config_for, serve_process, wait_idle

from irmiddleware.proxy import ConfigError, create_app, parse_config
from irmiddleware.testing import assert_idle, create_tgi_app, serve_in_thread, wait_until

BODY = {"model": "m", "prompt": "Hi", "max_tokens": 2}


def _ready(url: str, path: str = "/ready") -> tuple[int, Any]:
    answer = httpx.get(f"{url}{path}", timeout=5)
    return answer.status_code, answer.json()


def _two_models(urls: list[str], **router: Any) -> Any:
    backends = [
        {"url": urls[0], "models": ["m"], "capacity": 8},
        {"url": urls[1], "models": ["m"], "capacity": 8},
        {"url": urls[2], "models": ["other"], "capacity": 8},
    ]
    return parse_config({"router": {**FAST_FLEET, **router}, "backends": backends})


@pytest.mark.slow  # waits for several rounds of health checks
def test_readiness_follows_every_model_and_liveness_stays(emulators: Emulators, router: Routers) -> None:
    first, second = emulators(2)
    (other,) = emulators(1, served_model_names=("other",))
    server = router(_two_models([first.url, second.url, other.url]))
    assert _ready(server.url) == (200, {"ready": True})
    first.emulator.reconfigure(unhealthy=True)  # "m" keeps one healthy backend: still ready
    wait_until(lambda: _state(server, first.url) == "down", "first backend down")
    assert _ready(server.url) == (200, {"ready": True})
    other.server.stop()  # every backend of "other" is gone
    wait_until(lambda: _ready(server.url)[0] == 503, "not ready without a backend for `other`")
    assert _ready(server.url) == (503, {"ready": False, "reason": "no active backend for other"})
    live = httpx.get(f"{server.url}/health")
    assert live.status_code == 200 and live.json() == {"status": "ok"}
    assert live.headers["cache-control"] == "no-store"
    second.emulator.reconfigure(unhealthy=True)
    wait_until(lambda: "m, other" in _ready(server.url)[1].get("reason", ""), "both models down")
    first.emulator.reconfigure(unhealthy=False)
    second.emulator.reconfigure(unhealthy=False)
    wait_until(lambda: _ready(server.url)[1].get("reason") == "no active backend for other", "m back")
    assert httpx.post(f"{server.url}/v1/completions", json=BODY).status_code == 200
    wait_idle(server.app)
    assert_idle(server.app.router)


def test_any_backend_is_ready_while_one_backend_is_up(emulators: Emulators, router: Routers) -> None:
    first, second = emulators(2)
    (other,) = emulators(1, served_model_names=("other",))
    server = router(_two_models([first.url, second.url, other.url], probes={"ready": "any_backend"}))
    other.emulator.reconfigure(unhealthy=True)
    wait_until(lambda: _state(server, other.url) == "down", "`other` down")
    assert _ready(server.url) == (200, {"ready": True})  # `every_model` would say 503 now
    for backend in (first, second):
        backend.emulator.reconfigure(unhealthy=True)
    wait_until(lambda: _ready(server.url)[0] == 503, "no backend up")
    assert _ready(server.url)[1] == {"ready": False, "reason": "no backend is active"}
    other.emulator.reconfigure(unhealthy=False)
    wait_until(lambda: _ready(server.url)[0] == 200, "one backend back")


def test_probes_are_answered_by_the_router_never_proxied(emulators: Emulators, router: Routers) -> None:
    (backend,) = emulators(1)
    server = router(config_for([backend.url], **FAST_FLEET))
    with httpx.Client(base_url=server.url) as http:
        assert http.head("/ready").status_code == 200 and http.head("/health").status_code == 200
        assert http.post("/ready").status_code == 404  # only GET and HEAD: the app behind answers
        assert http.get("/readyz").status_code == 404
        for _ in range(3):
            assert http.get("/ready").status_code == 200 and http.get("/health").status_code == 200
    assert backend.emulator.stats.received == 0
    moved = router(config_for([backend.url], probes={"health_path": "/livez", "ready_path": "/readyz"}))
    assert httpx.get(f"{moved.url}/livez").json() == {"status": "ok"}
    assert _ready(moved.url, "/readyz") == (200, {"ready": True})
    assert httpx.get(f"{moved.url}/ready").status_code == 404
    # `enabled = false` hands both paths to the app: test_health's fleet-health test checks it.


def test_a_path_the_fleet_routes_stays_the_adapters(
    router: Routers, caplog: pytest.LogCaptureFixture
) -> None:
    # TGI's clients ask `/health` whether the server can generate: the router answers that from the
    # fleet (TGI's own body), and the liveness probe needs another path.
    app = create_tgi_app(model_id="t")
    with serve_in_thread(app) as backend, caplog.at_level("WARNING", "irmiddleware.proxy"):
        config = parse_config({"router": FAST_FLEET, "backends": [{"url": backend.url, "type": "tgi"}]})
        server = router(config)
        app.state.emulator.reconfigure(unhealthy=True)
        wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 503, "TGI health 503")
        assert httpx.get(f"{server.url}/health").json() == {"error": "unhealthy", "error_type": "healthcheck"}
        assert _ready(server.url)[0] == 503  # the readiness probe still answers on its own path
    assert any("router.probes.health_path /health" in r.getMessage() for r in caplog.records)


def test_begin_shutdown_and_lifespan_shutdown_turn_readiness_off(
    emulators: Emulators, router: Routers
) -> None:
    (backend,) = emulators(1)
    server = router(config_for([backend.url], **FAST_FLEET))
    assert _ready(server.url)[0] == 200
    server.app.begin_shutdown()
    assert _ready(server.url) == (503, {"ready": False, "reason": "shutting down"})
    assert httpx.post(f"{server.url}/v1/completions", json=BODY).status_code == 200  # routing goes on
    assert httpx.get(f"{server.url}/health").status_code == 200
    wait_idle(server.app)

    app = create_app(config_for([backend.url], health={"enabled": False}))
    try:
        asyncio.run(_run_lifespan(app))
        assert app.probes.not_ready() == "shutting down"
    finally:
        app.close()


async def _run_lifespan(app: Any) -> None:
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    ready_at_startup: list[str | None] = []

    async def receive() -> dict[str, str]:
        return next(messages)

    async def send(message: dict[str, str]) -> None:
        if message["type"] == "lifespan.startup.complete":
            ready_at_startup.append(app.probes.not_ready())

    await app({"type": "lifespan"}, receive, send)
    assert ready_at_startup == [None]


@pytest.mark.parametrize(
    ("probes", "message"),
    [
        ({"ready": "all"}, "`router.probes.ready` must be one of every_model, any_backend, got 'all'"),
        ({"health_path": "health"}, "`router.probes.health_path` must start with '/', got 'health'"),
        ({"ready_path": "/health"}, "`router.probes.health_path` and `ready_path` are both '/health'"),
        ({"shutdown_delay_s": -1}, "`router.probes.shutdown_delay_s` must be >= 0.0, got -1.0"),
        ({"enabled": "yes"}, "`router.probes.enabled` must be bool, got 'yes'"),
        ({"ready_s": 1}, "unknown key `router.probes.ready_s`"),
    ],
)
def test_bad_probes_values_are_one_clear_error(probes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({"router": {"probes": probes}, "backends": [{"url": "http://127.0.0.1:9"}]})
    assert str(error.value).startswith(message)


def _state(server: Any, url: str) -> str:
    status = httpx.get(f"{server.url}/irm/status").json()
    return str(next(b for b in status["backends"] if b["url"] == url)["state"])


# ---- `irmiddleware serve`: readiness off at SIGTERM, requests in flight finish -------------------


@pytest.mark.slow  # a real `irmiddleware serve` process, signalled
def test_sigterm_turns_readiness_off_while_a_stream_finishes(emulators: Emulators, tmp_path: Path) -> None:
    (backend,) = emulators(1, time_per_output_token_s=0.02)
    config = tmp_path / "router.toml"
    config.write_text(
        f'[router.probes]\nshutdown_delay_s = 30\n\n[[backends]]\nurl = "{backend.url}"\nmodels = ["m"]\n'
    )
    body = {"model": "m", "prompt": "Hi", "max_tokens": 150, "ignore_eos": True, "stream": True}
    with (
        serve_process("--config", str(config), "--log-level", "warning") as (process, url),
        httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response,
    ):
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the stream is under way
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{url}/ready").status_code == 503, "readiness off")
        assert httpx.get(f"{url}/ready").json() == {"ready": False, "reason": "shutting down"}
        assert backend.emulator.stats.running == 1  # the stream is still in flight
        # During the delay the router still serves what a load balancer sends before it notices.
        assert httpx.get(f"{url}/health").status_code == 200
        late = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
        assert late.status_code == 200
        process.send_signal(signal.SIGTERM)  # a second signal: the graceful shutdown starts now
        rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and len(rest) == 150  # 149 more tokens, then [DONE]
        assert process.wait(20) in (0, -signal.SIGTERM)
    assert backend.emulator.stats.completed == 2 and backend.emulator.stats.aborted == 0


@pytest.mark.slow  # the example waits for health checks
def test_the_docs_probe_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    doc = (Path(__file__).resolve().parents[2] / "doc" / "proxy.md").read_text(encoding="utf-8")
    block = doc.split("A runnable example: readiness follows", 1)[1].split("```python\n", 1)[1]
    exec(compile(block.split("```", 1)[0], "doc/proxy.md", "exec"), {"__name__": "doc_example"})
    assert capsys.readouterr().out.splitlines() == [
        "{'status': 'ok'} {'ready': True}",
        "{'ready': False, 'reason': 'no active backend for m'}",
        "{'ready': False, 'reason': 'shutting down'}",
        "200",
    ]
