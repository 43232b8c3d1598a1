"""Passive outlier detection and overload mapping with real processes on 127.0.0.1:
- a backend killed mid-run is ejected, and every request that could still be retried (no byte had
  reached the client) succeeds on another backend; the backend, started again on its port, is
  re-admitted once its cool-down is over and its health check passes;
- a backend answering its adapter's overload status (vLLM 503, TGI 429) has the request retried
  elsewhere (the client never sees it) and gets less traffic than its peers;
- the panic threshold: ejections never empty a pool; when a pool's only backend fails, it keeps
  getting the traffic (and its answers are relayed);
after every test the in-flight counters are back to zero."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from proxy_support import (
    FAST,
    FAST_FLEET,
    Emulators,
    Routers,
    backend_status,
    wait_idle,
)

from irmiddleware.proxy import parse_config
from irmiddleware.testing import (
    TGIConfig,
    assert_idle,
    create_tgi_app,
    create_vllm_app,
    serve_in_thread,
    wait_until,
)

BODY = {"model": "m", "prompt": "Hi", "max_tokens": 4}


def _config(backends: list[dict[str, Any]], **router: Any) -> Any:
    return parse_config({"router": {**FAST_FLEET, **router}, "backends": backends})


def _post(url: str) -> int:
    with httpx.Client(timeout=30) as client:
        return client.post(f"{url}/v1/completions", json=BODY).status_code


@pytest.mark.slow
def test_killed_backend_is_ejected_and_readmitted_when_back(emulators: Emulators, router: Routers) -> None:
    backends = emulators(3, time_per_output_token_s=0.005)
    doomed = backends[1]
    entries = [{"url": b.url, "models": ["m"], "capacity": 16} for b in backends]
    server = router(_config(entries))
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(_post, server.url) for _ in range(40)]
        wait_until(lambda: doomed.emulator.stats.completed >= 2, "traffic on the doomed backend")
        doomed.server.kill()  # in-flight requests on it see a reset before any response byte
        futures += [pool.submit(_post, server.url) for _ in range(40)]
        statuses = [future.result(timeout=60) for future in futures]
    assert statuses == [200] * len(statuses)  # every one was retriable, so every one succeeded
    wait_until(lambda: backend_status(server, doomed.url)["state"] == "down", "killed backend out")
    assert backend_status(server, doomed.url)["healthy"] is False

    # Back on the same port: re-admitted after the cool-down and passing checks.
    app = create_vllm_app(served_model_names=("m",), **FAST)
    with serve_in_thread(app, port=doomed.server.port):
        wait_until(lambda: backend_status(server, doomed.url)["state"] == "active", "re-admitted")
        for _ in range(9):
            assert _post(server.url) == 200
        assert app.state.emulator.stats.received >= 1
    wait_idle(server.app)
    wait_idle(server.app)
    assert_idle(server.app.router)


@contextlib.contextmanager
def _overloaders(kind: str) -> Iterator[tuple[list[str], Callable[[], int]]]:
    """Three backends of one adapter type, the first answering that adapter's overload status.
    Yields their URLs and a reader of how many requests the overloaded one received."""
    with contextlib.ExitStack() as stack:
        apps = []
        for index in range(3):
            if kind == "vllm":
                app = create_vllm_app(
                    served_model_names=("m",), **FAST, fail_status=503 if index == 0 else None
                )
            else:
                config = TGIConfig(
                    model_id="m", time_per_output_token_s=0.001, fail_status=429 if index == 0 else None
                )
                app = create_tgi_app(config)
            apps.append((app, stack.enter_context(serve_in_thread(app))))
        yield [server.url for _app, server in apps], lambda: apps[0][0].state.emulator.stats.received


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "path", "body"),
    [
        ("vllm", "/v1/completions", BODY),
        ("tgi", "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 4}}),
    ],
)
def test_overloaded_backend_is_skipped_and_gets_less_traffic(
    router: Routers, kind: str, path: str, body: dict[str, Any]
) -> None:
    with _overloaders(kind) as (urls, overloaded_received):
        entries = [{"url": url, "type": kind, "models": ["m"]} for url in urls]
        # A penalty that outlasts several requests however slow the machine is: with one shorter
        # than three answers, round robin would come back to the backend just as it is re-admitted.
        outliers = {**FAST_FLEET["outliers"], "overload_penalty_s": 2.0}
        server = router(_config(entries, strategy="round_robin", outliers=outliers))
        statuses = [httpx.post(f"{server.url}{path}", json=body).status_code for _ in range(30)]
        assert statuses == [200] * 30  # each overload answer was retried on a peer
        peers = [backend_status(server, url)["completed"] for url in urls[1:]]
        assert overloaded_received() < min(peers)  # round robin alone would give it a third
        assert (
            f'irm_outlier_ejections_total{{backend="{urls[0]}",reason="overload"}}'
            in httpx.get(f"{server.url}/metrics").text
        )
        wait_idle(server.app)
        assert_idle(server.app.router)


@pytest.mark.slow
def test_panic_threshold_keeps_a_pool_routable(emulators: Emulators, router: Routers) -> None:
    first, second = emulators(2, fail_status=500)
    entries = [{"url": b.url, "models": ["m"]} for b in (first, second)]
    server = router(_config(entries, outliers={**FAST_FLEET["outliers"], "consecutive_errors": 1}))
    for _ in range(20):
        assert httpx.post(f"{server.url}/v1/completions", json=BODY).status_code == 500  # relayed
        states = [backend_status(server, b.url)["state"] for b in (first, second)]
        assert "active" in states  # half of the pool stays eligible: never both out
    (alone,) = emulators(1, served_model_names=("solo",), fail_status=500)
    solo = router(_config([{"url": alone.url, "models": ["solo"]}], outliers={"consecutive_errors": 1}))
    for _ in range(5):
        response = httpx.post(f"{solo.url}/v1/completions", json={**BODY, "model": "solo"})
        assert response.status_code == 500
    assert backend_status(solo, alone.url)["ejected"] is True
    assert backend_status(solo, alone.url)["state"] == "active"  # panic: ejected but routed to
    assert alone.emulator.stats.received == 5
    wait_idle(server.app)
    assert_idle(server.app.router)
    wait_idle(solo.app)
    assert_idle(solo.app.router)
