"""The router's request ids and log lines, against real vLLM emulators.

`X-Request-ID`: a sane id from the client (1-128 visible ASCII characters) reaches the backend and
comes back; a missing, malformed or repeated one is replaced by a generated id, which reaches the
backend and comes back too; every answer carries it, the router's own errors and model lists
included, exactly once even when the backend echoes it.

`irmiddleware serve --log-format json --access-log`, run as a process: every line it writes to
stderr parses as JSON, the startup line names the listen address, the strategy and each backend
with its models and capacity, and each request has one access-log line with its id, method, path,
model, backend, status, outcome, time to first byte and duration. The text format carries the
same access line. `[router] log_format` and `access_log` are checked like every key."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import sys
from typing import Any

import httpx
import pytest
from proxy_support import Emulators, Routers, config_for, serve_process, wait_idle

from irmiddleware.proxy import ConfigError, parse_config
from irmiddleware.proxy._logs import JsonFormatter

BODY = {"model": "m", "prompt": "Hi", "max_tokens": 2}


def test_the_client_request_id_reaches_the_backend_and_comes_back(
    emulators: Emulators, router: Routers
) -> None:
    # The backend echoes the id it got (vLLM's --enable-request-id-headers): still one header back.
    (backend,) = emulators(1, enable_request_id_headers=True)
    server = router(config_for([backend.url]))
    with httpx.Client(base_url=server.url) as http:
        answer = http.post("/v1/completions", json=BODY, headers={"x-request-id": "client-42"})
        assert answer.status_code == 200
        assert answer.headers.get_list("x-request-id") == ["client-42"]
        assert backend.emulator.stats.last_request_id == "client-42"
        streamed = {**BODY, "stream": True}
        with http.stream("POST", "/v1/completions", json=streamed, headers={"x-request-id": "s-1"}) as r:
            assert r.headers.get_list("x-request-id") == ["s-1"] and r.read().endswith(b"[DONE]\n\n")
        assert backend.emulator.stats.last_request_id == "s-1"
    wait_idle(server.app)


INSANE_IDS = {
    "none": [],
    "too long": [("x-request-id", "x" * 129)],
    "a space": [("x-request-id", "two words")],
    "not ASCII": [("x-request-id", "é")],
    "sent twice": [("x-request-id", "a"), ("x-request-id", "b")],
}


def test_a_missing_or_insane_request_id_is_replaced(emulators: Emulators, router: Routers) -> None:
    (backend,) = emulators(1)
    server = router(config_for([backend.url]))
    seen: set[str] = set()
    for case, sent in INSANE_IDS.items():
        headers = httpx.Headers([(name, value.encode()) for name, value in sent])
        answer = httpx.post(f"{server.url}/v1/completions", json=BODY, headers=headers)
        (generated,) = answer.headers.get_list("x-request-id")
        assert generated not in [value for _name, value in sent], case
        assert backend.emulator.stats.last_request_id == generated, case  # the backend got the same
        assert generated not in seen, case  # one per request
        seen.add(generated)


def test_the_routers_own_answers_carry_the_request_id(emulators: Emulators, router: Routers) -> None:
    (backend,) = emulators(1)
    server = router(config_for([backend.url]))
    with httpx.Client(base_url=server.url) as http:
        unknown = http.post("/v1/completions", json={**BODY, "model": "zz"}, headers={"x-request-id": "e1"})
        assert unknown.status_code == 404 and unknown.headers["x-request-id"] == "e1"
        bad = http.post("/v1/completions", content=b"{", headers={"x-request-id": "e2"})
        assert bad.status_code == 400 and bad.headers["x-request-id"] == "e2"
        models = http.get("/v1/models")
        assert models.status_code == 200 and models.headers["x-request-id"]
    backend.server.stop()
    down = httpx.post(f"{server.url}/v1/completions", json=BODY, headers={"x-request-id": "e3"})
    assert down.status_code == 502 and down.headers["x-request-id"] == "e3"
    wait_idle(server.app)


def test_the_json_formatter_keeps_extras_and_exceptions() -> None:
    record = logging.makeLogRecord(
        {"name": "x", "levelname": "INFO", "msg": "a %s", "args": ("b",), "request_id": "r", "n": 2}
    )
    line = json.loads(JsonFormatter().format(record))
    assert line.pop("time").endswith("Z")
    assert line == {
        "level": "INFO",
        "logger": "x",
        "message": "a b",
        "request_id": "r",
        "n": 2,
    }
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        failed = logging.getLogger("x").makeRecord("x", logging.ERROR, "f", 1, "m", (), sys.exc_info())
    text = JsonFormatter().format(failed)
    assert "\n" not in text and "boom" in json.loads(text)["exception"]


@pytest.mark.parametrize(
    ("router", "message"),
    [
        ({"log_format": "xml"}, "`router.log_format` must be one of text, json, got 'xml'"),
        ({"access_log": "yes"}, "`router.access_log` must be bool, got 'yes'"),
    ],
)
def test_bad_log_keys_are_one_clear_error(router: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({"router": router, "backends": [{"url": "http://127.0.0.1:9"}]})
    assert str(error.value) == message


# ---- `irmiddleware serve`, as a process ----------------------------------------------------------


def _serve(
    backend_url: str, *flags: str
) -> contextlib.AbstractContextManager[tuple[subprocess.Popen[str], str]]:
    args = ("--backend", backend_url, "--model", "m", "--capacity", "8", *flags)
    return serve_process(*args, stderr=subprocess.PIPE)


def _stop(process: subprocess.Popen[str]) -> list[str]:
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=20)
    return err.splitlines()


@pytest.mark.slow  # a real `irmiddleware serve` process
def test_serve_json_logs_parse_line_by_line(emulators: Emulators) -> None:
    (backend,) = emulators(1)
    with _serve(backend.url, "--log-format", "json", "--access-log") as (process, url):
        with httpx.Client(base_url=url) as http:
            ok = http.post("/v1/completions", json=BODY, headers={"x-request-id": "json-1"})
            generated = http.post("/v1/completions", json=BODY).headers["x-request-id"]
            unknown = http.post("/v1/completions", json={**BODY, "model": "zz"})
            assert http.get("/ready").status_code == 200  # probes are not access-logged
        lines = [json.loads(line) for line in _stop(process)]  # every line is one JSON object
    assert ok.status_code == 200 and unknown.status_code == 404
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    (started,) = [line for line in lines if line["message"].startswith("router started")]
    assert started["listen"] == url.removeprefix("http://") and started["strategy"] == "p2c"
    assert started["backends"] == [{"url": backend.url, "type": "vllm", "capacity": 8, "models": ["m"]}]
    access = [line for line in lines if line["logger"] == "irmiddleware.access"]
    assert [line["request_id"] for line in access] == ["json-1", generated, unknown.headers["x-request-id"]]
    first = access[0]
    assert (first["method"], first["path"], first["model"], first["backend"]) == (
        "POST",
        "/v1/completions",
        "m",
        backend.url,
    )
    assert (first["status"], first["outcome"]) == (200, "ok")
    assert 0 <= first["ttfb_s"] <= first["duration_s"]
    assert (access[2]["status"], access[2]["outcome"], access[2]["model"]) == (404, "rejected", "none")
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's lines too


@pytest.mark.slow  # a real `irmiddleware serve` process
def test_serve_text_logs_have_the_startup_line_and_access_lines(emulators: Emulators) -> None:
    (backend,) = emulators(1)
    with _serve(backend.url, "--access-log") as (process, url):
        httpx.post(f"{url}/v1/completions", json=BODY, headers={"x-request-id": "text-1"})
        lines = _stop(process)
    (started,) = [line for line in lines if "router started" in line]
    where = url.removeprefix("http://")
    assert (
        f"listening on {where}, strategy p2c, 1 backends: {backend.url} (vllm, capacity 8, models m)"
        in started
    )
    (access,) = [line for line in lines if "irmiddleware.access" in line]
    assert (
        f"text-1 127.0.0.1 POST /v1/completions model=m backend={backend.url} status=200 outcome=ok" in access
    )


@pytest.mark.slow  # a real `irmiddleware serve` process
def test_the_access_log_is_written_whatever_the_log_level(emulators: Emulators) -> None:
    (backend,) = emulators(1)
    flags = ("--log-format", "json", "--access-log", "--log-level", "warning")
    with _serve(backend.url, *flags) as (process, url):
        httpx.post(f"{url}/v1/completions", json=BODY, headers={"x-request-id": "quiet-1"})
        lines = [json.loads(line) for line in _stop(process)]
    access = [line for line in lines if line["logger"] == "irmiddleware.access"]
    assert [line["request_id"] for line in access] == ["quiet-1"]
    assert not [line for line in lines if line["level"] == "INFO" and line["logger"] != "irmiddleware.access"]


@pytest.mark.slow  # a real `irmiddleware serve` process
def test_a_trusted_proxys_forwarded_client_is_the_access_logs_client(emulators: Emulators) -> None:
    # uvicorn's X-Forwarded-For handling (127.0.0.1 is trusted by default) runs only for a
    # request that carries such a header; one without keeps the connection's address.
    (backend,) = emulators(1)
    with _serve(backend.url, "--log-format", "json", "--access-log") as (process, url):
        with httpx.Client(base_url=url) as http:
            http.post("/v1/completions", json=BODY, headers={"x-forwarded-for": "203.0.113.9"})
            http.post("/v1/completions", json=BODY)
            http.post("/v1/completions", json=BODY, headers={"X-Forwarded-For": "198.51.100.7"})
        lines = [json.loads(line) for line in _stop(process)]
    access = [line for line in lines if line["logger"] == "irmiddleware.access"]
    assert [line["client"] for line in access] == ["203.0.113.9", "127.0.0.1", "198.51.100.7"]
