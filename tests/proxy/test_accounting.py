"""The one accounting invariant under a hostile mix, end to end over real sockets: normal requests
and streams, streams the client cuts off, backends answering errors, upstream timeouts and a
backend killed mid-run. Afterwards every in-flight counter is zero, routed = completed + failed on
every backend, and the router's outcome counters add up to the number of requests sent."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from proxy_support import Emulators, Routers, wait_idle

from irmiddleware.proxy import parse_config
from irmiddleware.testing import assert_idle

ROUNDS = 12  # each round sends one request of every kind below


def _outcomes(metrics_text: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "irm_requests":
            for sample in family.samples:
                if sample.name == "irm_requests_total":
                    outcome = sample.labels["outcome"]
                    totals[outcome] = totals.get(outcome, 0) + sample.value
    return totals


def _normal(client: httpx.Client) -> None:
    client.post("/v1/completions", json={"model": "ok", "prompt": "Hi", "max_tokens": 4})


def _stream(client: httpx.Client) -> None:
    body = {"model": "ok", "prompt": "Hi", "max_tokens": 4, "stream": True}
    with client.stream(
        "POST", "/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "x"}]}
    ) as r:
        for _line in r.iter_lines():
            pass


def _cut_stream(client: httpx.Client) -> None:
    body = {"model": "ok", "prompt": "Hi", "max_tokens": 60, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        next(lines)
        next(lines)  # then hang up mid-stream


def _error(client: httpx.Client) -> None:
    client.post("/v1/completions", json={"model": "err", "prompt": "Hi"})


def _timeout(client: httpx.Client) -> None:
    client.post("/v1/completions", json={"model": "slow", "prompt": "Hi", "max_tokens": 2})


def _send(url: str, kind: Callable[[httpx.Client], None]) -> None:
    # A client of its own per request, so a cut stream closes its connection for real.
    # A stream broken by the killed backend raises; what matters is the router's books.
    with httpx.Client(base_url=url, timeout=30) as client, contextlib.suppress(httpx.HTTPError):
        kind(client)


@pytest.mark.slow
def test_counters_balance_after_a_hostile_mix(emulators: Emulators, router: Routers) -> None:
    ok_a, ok_doomed = emulators(2, served_model_names=("ok",), time_per_output_token_s=0.02)
    (err,) = emulators(1, served_model_names=("err",), fail_status=503)
    (slow,) = emulators(1, served_model_names=("slow",), time_per_request_s=1.0)
    backends = [
        {"url": ok_a.url, "models": ["ok"]},
        {"url": ok_doomed.url, "models": ["ok"]},
        {"url": err.url, "models": ["err"]},
        {"url": slow.url, "models": ["slow"]},
    ]
    config = parse_config({"router": {"timeouts": {"read_s": 0.3}}, "backends": backends})
    server = router(config)
    kinds = [_normal, _stream, _cut_stream, _error, _timeout]
    sent = 0
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = []
        for round_number in range(ROUNDS):
            if round_number == ROUNDS // 2:
                ok_doomed.server.kill()  # in-flight streams on it break; new connections are refused
            futures += [pool.submit(_send, server.url, kind) for kind in kinds]
            sent += len(kinds)
            time.sleep(0.02)
        for future in futures:
            future.result(timeout=60)

    wait_idle(server.app)
    assert_idle(server.app.router)
    deadline = time.monotonic() + 5  # the last cut streams are counted a moment after release
    while sum((outcomes := _outcomes(httpx.get(f"{server.url}/metrics").text)).values()) < sent:
        assert time.monotonic() < deadline, outcomes
        time.sleep(0.02)
    assert sum(outcomes.values()) == sent, outcomes
    assert outcomes["ok"] >= 2 * ROUNDS - ROUNDS // 2  # normal requests and whole streams
    assert outcomes["backend_error"] == ROUNDS and outcomes["timeout"] == ROUNDS
    assert outcomes["client_disconnected"] >= 1
