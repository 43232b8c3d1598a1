"""Retries wait for capacity within the request's admission deadline, and an outage is not
saturation, with real uvicorn servers on 127.0.0.1 and vLLM emulators:

- a request whose first backend cannot be reached, or answers an overload status, while the other
  backend is momentarily full, waits in admission for that backend and is served (200), counted in
  `irm_retries_total`; it never goes back to a backend it already tried;
- a retry that finds no room before the admission deadline answers 503 `no_capacity`, not 502;
- every backend down (failing health checks, or drained) answers 503 `no_healthy_backend` with its
  own message and a `Retry-After` from the health-check interval; every backend full answers 503
  `no_capacity` with the configured `Retry-After`;
- a client that hangs up mid-stream leaves its backend's slot reserved until the backend itself
  has stopped: the backend's own count of requests in progress never exceeds its capacity;
  `abort_grace_s` is checked when the configuration is loaded.
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from proxy_support import Emulators, Routers, RouterServer, backend_status, held_stream, wait_idle

from irmiddleware.proxy import ConfigError, RoutingMiddleware, parse_config
from irmiddleware.testing import assert_idle, wait_until

BODY = {"model": "m", "prompt": "Hi", "max_tokens": 2}
HOLD = {"model": "m", "prompt": "hold", "max_tokens": 400, "ignore_eos": True, "stream": True}
NO_EJECTIONS = {"outliers": {"enabled": False}, "health": {"enabled": False}}


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def config(urls: list[str], capacity: int, router: dict[str, Any], **admission: Any) -> Any:
    backends = [{"url": url, "capacity": capacity, "models": ["m"]} for url in urls]
    return parse_config({"router": router, "backends": backends, "admission": admission})


def samples(server: RouterServer, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def outcomes(server: RouterServer) -> dict[str, float]:
    counted: dict[str, float] = {}
    for labels, value in samples(server, "irm_requests_total").items():
        outcome = dict(labels)["outcome"]
        counted[outcome] = counted.get(outcome, 0.0) + value
    return counted


def served_while_the_other_backend_is_full(server: RouterServer, full_url: str) -> httpx.Response:
    """Holds the only slot of the backend at `full_url` with a stream (the other backend drained
    meanwhile, so the stream goes there), sends a request (which can only go to the other backend
    first), waits until it is queued for a retry, then lets the stream go; returns its answer."""
    app: RoutingMiddleware = server.app
    (other,) = (b.id for b in app.fleet.backends.values() if b.url != full_url)
    app.drain(other)
    with ThreadPoolExecutor(1) as pool, held_stream(server.url, "/v1/completions", HOLD):
        app.undrain(other)
        assert backend_status(server, full_url)["requests_in_flight"] == 1
        answer = pool.submit(httpx.post, f"{server.url}/v1/completions", json=BODY, timeout=30)
        wait_until(lambda: app.admission.queue.total == 1, "the retry waits for the full backend")
    return answer.result(timeout=30)


@pytest.mark.slow
def test_a_connect_failure_waits_for_a_full_backend(emulators: Emulators, router: Routers) -> None:
    (healthy,) = emulators(1, time_per_output_token_s=0.02)
    dead = closed_port_url()
    server = router(config([dead, healthy.url], 1, NO_EJECTIONS, max_queue=8, max_wait_s=20))
    answer = served_while_the_other_backend_is_full(server, healthy.url)
    assert answer.status_code == 200, answer.text
    assert samples(server, "irm_retries_total") == {(("backend", dead), ("reason", "connect_error")): 1.0}
    assert outcomes(server) == {"ok": 1.0, "client_disconnected": 1.0}
    wait_idle(server.app)
    assert_idle(server.app.router)


@pytest.mark.slow
def test_an_overload_answer_waits_for_another_backend(emulators: Emulators, router: Routers) -> None:
    overloaded, healthy = emulators(2, time_per_output_token_s=0.02)
    overloaded.emulator.reconfigure(fail_status=429)
    server = router(config([overloaded.url, healthy.url], 1, NO_EJECTIONS, max_queue=8, max_wait_s=20))
    answer = served_while_the_other_backend_is_full(server, healthy.url)
    assert answer.status_code == 200, answer.text
    assert overloaded.emulator.stats.received == 1  # tried once, never again
    retried = samples(server, "irm_retries_total")
    assert retried == {(("backend", overloaded.url), ("reason", "overloaded")): 1.0}
    wait_idle(server.app)


@pytest.mark.slow
def test_a_retry_gives_up_at_the_admission_deadline_as_saturation(
    emulators: Emulators, router: Routers
) -> None:
    (healthy,) = emulators(1, time_per_output_token_s=0.02)
    server = router(config([closed_port_url(), healthy.url], 1, NO_EJECTIONS, max_queue=8, max_wait_s=0.5))
    with held_stream(server.url, "/v1/completions", HOLD):
        answer = httpx.post(f"{server.url}/v1/completions", json=BODY, timeout=30)
    assert answer.status_code == 503, answer.text
    assert "has capacity" in answer.json()["error"]["message"]
    assert outcomes(server)["no_capacity"] == 1.0
    assert samples(server, "irm_admission_shed_total") == {(("class", "0"), ("reason", "timeout")): 1.0}
    wait_idle(server.app)


@pytest.mark.slow
def test_an_outage_is_not_saturation(emulators: Emulators, router: Routers) -> None:
    backends = emulators(2, time_per_output_token_s=0.02)
    health = {"interval_s": 0.5, "timeout_s": 0.5, "healthy_threshold": 4, "unhealthy_threshold": 1}
    server = router(config([b.url for b in backends], 1, {"health": health, "retry_after_s": 7}))
    app: RoutingMiddleware = server.app
    # All full: saturation, with the configured Retry-After.
    with held_stream(server.url, "/v1/completions", HOLD), held_stream(server.url, "/v1/completions", HOLD):
        full = httpx.post(f"{server.url}/v1/completions", json=BODY)
    assert full.status_code == 503 and full.headers["retry-after"] == "7"
    assert "has capacity" in full.json()["error"]["message"]
    assert outcomes(server).get("no_healthy_backend", 0.0) == 0.0
    # All failing their health checks: an outage, with a Retry-After of 4 checks 0.5 s apart.
    for backend in backends:
        backend.emulator.reconfigure(unhealthy=True)
    for backend in backends:
        wait_until(lambda b=backend: backend_status(server, b.url)["state"] == "down", "down")
    down = httpx.post(f"{server.url}/v1/completions", json=BODY)
    assert down.status_code == 503 and down.headers["retry-after"] == "2"
    assert "is up" in down.json()["error"]["message"]
    # All drained by an operator: an outage too.
    for backend in backends:
        backend.emulator.reconfigure(unhealthy=False)
    for backend_id in app.fleet.backends:
        app.drain(backend_id)
    drained = httpx.post(f"{server.url}/v1/completions", json=BODY)
    assert drained.status_code == 503 and drained.headers["retry-after"] == "2"
    counted = outcomes(server)
    assert (counted["no_capacity"], counted["no_healthy_backend"]) == (1.0, 2.0)
    shed = samples(server, "irm_admission_shed_total")
    assert shed == {
        (("class", "0"), ("reason", "no_capacity")): 1.0,
        (("class", "0"), ("reason", "no_healthy_backend")): 2.0,
    }


@pytest.mark.parametrize("value", [-0.1, 61.0, "1", True])
def test_abort_grace_is_checked_at_load(value: object) -> None:
    with pytest.raises(ConfigError, match=r"router\.timeouts\.abort_grace_s"):
        config([closed_port_url()], 1, {"timeouts": {"abort_grace_s": value}})
    assert config([closed_port_url()], 1, {}).timeouts.abort_grace_s == 0.5


@pytest.mark.slow
def test_a_slot_is_kept_until_the_backend_stopped_the_abandoned_request(
    emulators: Emulators, router: Routers
) -> None:
    # The backend would run 64 at once: only the router's capacity of 2 keeps it at 2.
    # A cut stream stops at the end of its decode step, up to 50 ms after the client went away.
    (backend,) = emulators(1, max_num_seqs=64, time_per_output_token_s=0.05)
    grace = {"timeouts": {"abort_grace_s": 0.2}}
    server = router(config([backend.url], 2, {**NO_EJECTIONS, **grace}, max_queue=64, max_wait_s=30))
    body = {**HOLD, "max_tokens": 50}
    stop = threading.Event()

    def hang_up_after_first_token() -> int:
        served = 0
        while not stop.is_set():
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
                assert response.status_code == 200
                next(response.iter_lines())
            served += 1
        return served

    with ThreadPoolExecutor(16) as pool:
        clients = [pool.submit(hang_up_after_first_token) for _ in range(16)]
        try:
            wait_until(lambda: backend.emulator.stats.received >= 100, "100 streams cut", timeout_s=60)
        finally:
            stop.set()
        assert sum(client.result(timeout=30) for client in clients) >= 100
    wait_idle(server.app)
    wait_until(lambda: backend.emulator.stats.in_progress == 0, "the backend stopped everything")
    stats = backend.emulator.stats
    assert stats.peak_in_progress <= 2, stats
    assert stats.repeated_ids == 0


class HangUpBackend:
    """A backend that reads each request whole and closes the connection without a byte of answer:
    the request was written, and the backend may have started on it."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.received = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # closed
            with connection:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = connection.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(b"POST /v1/completions "):  # not the signal scraper's GET
                    self.received += 1

    def close(self) -> None:
        self.listener.close()


@pytest.mark.slow
def test_a_reset_after_the_write_is_retried_elsewhere_never_resent(
    emulators: Emulators, router: Routers
) -> None:
    # Before the transport's at-most-once rule, the lean transport sent the request again on a
    # fresh connection to the same backend, silently; it is now the router's retry, counted.
    (healthy,) = emulators(1)
    hang_up = HangUpBackend()
    try:
        routing = {**NO_EJECTIONS, "signals": {"enabled": False}, "strategy": "round_robin"}
        server = router(config([hang_up.url, healthy.url], 4, routing))
        answers = [httpx.post(f"{server.url}/v1/completions", json=BODY, timeout=30) for _ in range(6)]
        assert [answer.status_code for answer in answers] == [200] * 6
        retried = samples(server, "irm_retries_total")
        assert hang_up.received >= 1  # round robin sent it some requests first
        assert retried == {(("backend", hang_up.url), ("reason", "upstream_error")): float(hang_up.received)}
        assert healthy.emulator.stats.received == 6
        wait_idle(server.app)
    finally:
        hang_up.close()
