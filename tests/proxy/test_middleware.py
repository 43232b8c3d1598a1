"""The routing middleware in front of real vLLM emulators: the official `openai` client works
through it (chat and completions, streaming or not, embeddings, models), routing follows the model
in the body, streams are relayed as they are generated, errors come in the OpenAI shape with the
documented statuses, connection failures are retried elsewhere, and it mounts inside a FastAPI app
next to the app's own routes. Every test ends with the router idle (`assert_idle`)."""

from __future__ import annotations

import json
import socket

import httpx
import openai
import pytest
from fastapi import FastAPI
from proxy_support import Emulators, Routers, RouterServer, config_for, wait_idle

from irmiddleware.proxy import RoutingMiddleware, create_app, parse_config
from irmiddleware.testing import assert_idle


def client_of(router: RouterServer) -> openai.OpenAI:
    # max_retries=0: the client must see the router's own answers, not its retries of them.
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)


def test_openai_client_through_the_router(emulators: Emulators, router: Routers) -> None:
    chat_backends = emulators(2)
    (embedder,) = emulators(1, served_model_names=("e",), embedding=True)
    config = parse_config(
        {"backends": [{"url": e.url, "models": ["m"]} for e in chat_backends] + [{"url": embedder.url}]}
    )
    server = router(config)
    client = client_of(server)

    assert sorted(model.id for model in client.models.list()) == ["e", "m"]  # "e" was discovered
    chat = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert chat.object == "chat.completion" and chat.usage is not None
    completion = client.completions.create(model="m", prompt="Hello", max_tokens=3)
    assert completion.choices[0].finish_reason == "length"
    pieces = [
        c.choices[0].delta.content
        for c in client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, stream=True
        )
        if c.choices
    ]
    assert len(pieces) == 6  # the role chunk, then one chunk per token
    texts = [
        c.choices[0].text
        for c in client.completions.create(model="m", prompt="Hi", max_tokens=4, stream=True)
    ]
    assert len(texts) == 4
    embedding = client.embeddings.create(model="e", input="some text")
    assert len(embedding.data[0].embedding) == 16

    assert embedder.emulator.stats.received == 1  # model-aware: only "e" requests went there
    assert sum(e.emulator.stats.received for e in chat_backends) == 4
    wait_idle(server.app)
    assert_idle(server.app.router)


@pytest.mark.slow
def test_streams_are_relayed_while_generated(emulators: Emulators, router: Routers) -> None:
    (backend,) = emulators(1, time_per_output_token_s=0.05)
    server = router(config_for([backend.url]))
    body = {"model": "m", "prompt": "Hi", "max_tokens": 40, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        first = next(lines)
        # The first token reached us while the backend was still generating the other 39.
        assert first.startswith("data: {") and backend.emulator.stats.running == 1
        rest = list(lines)
    assert [line for line in rest if line][-1] == "data: [DONE]"
    wait_idle(server.app)
    assert_idle(server.app.router)


def test_router_errors_have_openai_shape(emulators: Emulators, router: Routers) -> None:
    (backend,) = emulators(1)
    server = router(config_for([backend.url], limits={"max_body_bytes": 1000}))
    url = f"{server.url}/v1/chat/completions"

    malformed = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "BadRequestError"
    no_model = httpx.post(url, json={"messages": []})
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
    unknown = httpx.post(url, json={"model": "nope", "messages": []})
    assert unknown.status_code == 404
    assert unknown.json()["error"] == {
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    too_large = httpx.post(url, json={"model": "m", "messages": [{"role": "user", "content": "x" * 2000}]})
    assert too_large.status_code == 413
    with pytest.raises(openai.NotFoundError):
        client_of(server).completions.create(model="nope", prompt="x")
    assert backend.emulator.stats.received == 0  # none of these needed a backend
    assert_idle(server.app.router)


def test_nothing_fits_is_503_with_retry_after(emulators: Emulators, router: Routers) -> None:
    (backend,) = emulators(1, time_per_output_token_s=0.05)
    only = {"url": backend.url, "capacity": 1, "models": ["m"]}
    config = parse_config({"router": {"retry_after_s": 3}, "backends": [only]})
    server = router(config)
    body = {"model": "m", "prompt": "Hi", "max_tokens": 20, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as holding:
        lines = holding.iter_lines()  # keep the iterator: dropping it closes the stream
        next(lines)  # the only slot is now held
        refused = httpx.post(f"{server.url}/v1/completions", json=body)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
        assert refused.json()["error"]["type"] == "ServiceUnavailableError"
    wait_idle(server.app)
    assert_idle(server.app.router)


def test_backend_status_and_headers_pass_through(emulators: Emulators, router: Routers) -> None:
    (backend,) = emulators(1, enable_request_id_headers=True)
    server = router(config_for([backend.url]))
    response = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "m", "prompt": "Hi", "max_tokens": 2},
        headers={"x-request-id": "abc", "connection": "keep-alive", "te": "trailers"},
    )
    assert response.headers["x-request-id"] == "abc" and response.json()["id"] == "cmpl-abc"
    assert len(response.headers.get_list("date")) == 1 and len(response.headers.get_list("server")) == 1
    backend.emulator.reconfigure(fail_status=500)
    failed = httpx.post(f"{server.url}/v1/completions", json={"model": "m", "prompt": "Hi"})
    assert failed.status_code == 500  # the backend's own answer, not retried, not rewritten
    assert failed.json()["error"]["code"] == 500
    wait_idle(server.app)  # the client can read the last byte before the router releases
    assert_idle(server.app.router)


@pytest.mark.slow
def test_upstream_timeout_is_504(emulators: Emulators, router: Routers) -> None:
    (slow,) = emulators(1, time_per_request_s=2.0)
    server = router(config_for([slow.url], timeouts={"read_s": 0.2}))
    response = httpx.post(
        f"{server.url}/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 2}
    )
    assert response.status_code == 504 and response.json()["error"]["type"] == "GatewayTimeoutError"
    wait_idle(server.app)
    assert_idle(server.app.router)


def _refused_url() -> str:
    with socket.socket() as sock:  # bound then closed: connecting is refused
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_connection_failures_are_retried_elsewhere(emulators: Emulators, router: Routers) -> None:
    (live,) = emulators(1)
    server = router(config_for([_refused_url(), live.url], strategy="round_robin"))
    for _ in range(6):
        response = httpx.post(
            f"{server.url}/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 2}
        )
        assert response.status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'irm_routing_decisions_total{result="retry",strategy="round_robin"}' in metrics
    assert_idle(server.app.router)


def test_no_reachable_backend_is_502(router: Routers) -> None:
    server = router(config_for([_refused_url(), _refused_url()]))
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "m", "prompt": "Hi"})
    assert response.status_code == 502 and response.json()["error"]["code"] == 502
    assert_idle(server.app.router)


def test_mounted_in_fastapi_next_to_its_routes(emulators: Emulators) -> None:
    (backend,) = emulators(1)
    app = FastAPI()

    @app.get("/hello")
    def hello() -> dict[str, str]:
        return {"hello": "world"}

    app.add_middleware(RoutingMiddleware, config=config_for([backend.url]))
    with RouterServer(app) as server:
        assert httpx.get(f"{server.url}/hello").json() == {"hello": "world"}
        assert httpx.get(f"{server.url}/elsewhere").status_code == 404  # FastAPI's own 404
        chat = client_of(server).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        assert chat.choices[0].message.content
        status = httpx.get(f"{server.url}/irm/status").json()
        assert status["backends"][0]["completed"] == 1 and status["backends"][0]["requests_in_flight"] == 0
        assert "irm_backend_in_flight" in httpx.get(f"{server.url}/metrics").text
    # FastAPI built the middleware itself: find it in the app's stack to free its table.
    layer = app.middleware_stack
    while not isinstance(layer, RoutingMiddleware):
        layer = layer.app
    layer.close()


def test_standalone_app_answers_404_elsewhere(emulators: Emulators, router: Routers) -> None:
    (backend,) = emulators(1)
    server = router(create_app(config_for([backend.url])))
    response = httpx.get(f"{server.url}/nothing-here")
    assert response.status_code == 404 and json.loads(response.text)["error"]["code"] == 404
    assert httpx.get(f"{server.url}/v1/chat/completions").status_code == 404  # wrong method: not routed
