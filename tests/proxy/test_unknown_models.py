"""Models that come and go, driven by the official `openai` client against real vLLM emulators.

A backend configured without `models` that is down when the router starts leaves its models
unknown: until it has said which models it serves, a request for a model no backend is known to
serve is a 503 `no_healthy_backend` with `Retry-After` (the client may retry), not a 404 (which the
client raises as a final `NotFoundError`). Once the backend comes up, its first passing health check
discovers its models and the same request is served; once every backend has reported, a model none
serves is a 404 again. A backend configured with a model it does not list is named at startup, in
one warning line with the models it does list (`irmiddleware serve --backend URL --model M`).
"""

from __future__ import annotations

import socket
import subprocess

import httpx
import openai
import pytest
from proxy_support import FAST, FAST_FLEET, Routers, serve_process

from irmiddleware.proxy import parse_config
from irmiddleware.testing import create_vllm_app, serve_in_thread, wait_until


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=10)


@pytest.mark.slow
def test_a_model_of_a_backend_down_at_startup_is_503_then_served(router: Routers) -> None:
    port = _free_port()  # nothing listens yet: the backend is down when the router starts
    url = f"http://127.0.0.1:{port}"
    config = parse_config({"router": FAST_FLEET, "backends": [{"url": url, "type": "vllm", "capacity": 8}]})
    server = router(config)
    client = _client(server.url)
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model="m", prompt="Hi", max_tokens=2)
    assert not isinstance(refused.value, openai.NotFoundError)
    assert refused.value.status_code == 503
    assert refused.value.response.headers["retry-after"] == "1"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'irm_requests_total{backend="none",model="none",outcome="no_healthy_backend"' in metrics

    app = create_vllm_app(served_model_names=("m",), **FAST)
    with serve_in_thread(app, port=port):
        wait_until(lambda: server.app.fleet.serves("m"), "the backend's models discovered", timeout_s=10)
        answer = client.completions.create(model="m", prompt="Hi", max_tokens=2)
        assert answer.choices[0].text
        assert [model.id for model in client.models.list()] == ["m"]
        # Every backend has reported: a model none serves is final.
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nobody-serves-this", prompt="Hi", max_tokens=2)


@pytest.mark.slow
def test_serve_warns_about_a_model_a_backend_does_not_list() -> None:
    app = create_vllm_app(served_model_names=("m", "n"), **FAST)
    with serve_in_thread(app) as backend:
        args = ("--backend", backend.url, "--model", "m", "--model", "typo")
        with serve_process(*args, stderr=subprocess.PIPE) as (process, _url):
            process.terminate()
            _out, err = process.communicate(timeout=30)
    warnings = [line for line in err.splitlines() if "does not list" in line]
    assert len(warnings) == 1, err
    assert backend.url in warnings[0] and "`typo`" in warnings[0] and "m, n" in warnings[0]
