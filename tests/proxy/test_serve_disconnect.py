"""Under `irmiddleware serve`, a client that hangs up before its answer is complete cancels its
request at once, streaming or not: the server tells the middleware through its disconnect callback
(the `irmiddleware.on_disconnect` scope extension, which replaces a task per request waiting in
`receive()`), the upstream connection is closed so the backend stops generating long before it
would have finished, the request is counted `client_disconnected`, and nothing stays in flight."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from proxy_support import Emulator, Emulators, held_stream, serve_process

from irmiddleware.testing import wait_until

pytestmark = pytest.mark.slow  # starts a router process

# 400 tokens at 25 ms each: 10 s of generation, far longer than any wait below.
BODY: dict[str, Any] = {"model": "m", "prompt": "Hello", "max_tokens": 400, "ignore_eos": True}


def _in_progress(backend: Emulator) -> int:
    stats: dict[str, Any] = httpx.get(f"{backend.url}/_emulator/stats", timeout=5).json()
    return int(stats["in_progress"])


def _disconnected_count(url: str) -> float:
    page = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == "irm_requests_total" and sample.labels["outcome"] == "client_disconnected"
    )


def _in_flight(url: str) -> int:
    status: dict[str, Any] = httpx.get(f"{url}/irm/status", timeout=5).json()
    return sum(int(backend["requests_in_flight"]) for backend in status["backends"])


def _cancelled_at_once(backend: Emulator, url: str, count: int) -> None:
    wait_until(lambda: _in_progress(backend) == 0, "the backend stops generating", timeout_s=5)
    wait_until(lambda: _disconnected_count(url) == count, "counted client_disconnected", timeout_s=5)
    # The slot comes back after the abort grace (the backend needs a moment to notice).
    wait_until(lambda: _in_flight(url) == 0, "nothing in flight", timeout_s=5)


def test_a_client_hanging_up_cancels_its_request_under_serve(emulators: Emulators) -> None:
    (backend,) = emulators(1, time_per_output_token_s=0.025)
    with serve_process("--backend", backend.url, "--model", "m", "--log-level", "warning") as (_, url):
        # Streaming: the client goes away after the first event.
        with held_stream(url, "/v1/completions", {**BODY, "stream": True}):
            assert _in_progress(backend) == 1
        _cancelled_at_once(backend, url, 1)

        # Not streaming: the client goes away while the router waits for the whole answer.
        body = httpx.Request("POST", f"{url}/v1/completions", json=BODY).content
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as client:
            head = f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            client.sendall(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
            wait_until(lambda: _in_progress(backend) == 1, "the backend is generating", timeout_s=5)
        _cancelled_at_once(backend, url, 2)
