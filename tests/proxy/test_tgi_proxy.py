"""The router in front of TGI emulators, driven by real clients: `huggingface_hub.InferenceClient`
(`text_generation` with and without streaming, through the `/` compat route, and
`chat_completion`), the `openai` client against the chat endpoint, and raw `/generate`,
`/generate_stream` (events without `[DONE]`), `/info` and `/health`. Backends' models come from
`/info`'s `model_id`; requests that name no model (or "tgi", or the hub's "dummy") go to the one
model the TGI fleet serves. Errors the router answers itself have TGI's shape. Overload reported
inside a 200 stream (TGI's streaming routes) is retried on another backend, or relayed as is when
no other backend could take the request."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from proxy_support import FAST_FLEET, Routers, RouterServer, held_stream, wait_idle

from irmiddleware.adapters import TGIAdapter
from irmiddleware.proxy import parse_config
from irmiddleware.testing import TGIConfig, assert_idle, create_tgi_app, serve_in_thread, wait_until

MODEL = "org/tgi-model"


@contextlib.contextmanager
def _tgi_router(router: Routers, count: int = 2) -> Iterator[RouterServer]:
    with contextlib.ExitStack() as stack:
        urls = []
        for _ in range(count):
            app = create_tgi_app(TGIConfig(model_id=MODEL, time_per_output_token_s=0.001))
            urls.append(stack.enter_context(serve_in_thread(app)).url)
        backends = [{"url": url, "type": "tgi"} for url in urls]  # models discovered from /info
        yield router(parse_config({"router": FAST_FLEET, "backends": backends}))


def test_huggingface_hub_client_through_the_router(router: Routers) -> None:
    with _tgi_router(router) as server:
        client = InferenceClient(model=server.url)
        text = client.text_generation("Hello", max_new_tokens=5)
        assert isinstance(text, str) and text
        streamed = list(client.text_generation("Hello", max_new_tokens=5, stream=True))
        assert "".join(streamed) == text  # same prompt, same deterministic answer
        chat = client.chat_completion([{"role": "user", "content": "Hi"}], max_tokens=6)
        assert chat.choices[0].message.content
        chunks = list(client.chat_completion([{"role": "user", "content": "Hi"}], max_tokens=6, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        wait_idle(server.app)
        assert_idle(server.app.router)


def test_openai_client_and_raw_routes(router: Routers) -> None:
    with _tgi_router(router) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="tgi", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content
        stream = client.chat.completions.create(
            model="tgi", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True
        )
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert [m.id for m in client.models.list()] == [MODEL]
        with httpx.Client(base_url=server.url) as http:
            assert http.get("/info").json()["model_id"] == MODEL
            assert http.get("/health").status_code == 200
            generated = http.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
            assert generated.status_code == 200 and "generated_text" in generated.json()
            with http.stream("POST", "/generate_stream", json={"inputs": "Hi"}) as response:
                raw = response.read().decode()
            assert raw.startswith("data:") and "[DONE]" not in raw
            too_big = http.post("/generate", content=b"x" * (17 * 1024 * 1024))
            assert too_big.status_code == 413 and set(too_big.json()) == {"error", "error_type"}
        wait_idle(server.app)
        assert_idle(server.app.router)


def test_health_follows_the_fleet(router: Routers) -> None:
    app = create_tgi_app(TGIConfig(model_id=MODEL))
    with serve_in_thread(app) as backend:
        config = parse_config(
            {"router": FAST_FLEET, "backends": [{"url": backend.url, "type": "tgi", "models": [MODEL]}]}
        )
        server = router(config)
        app.state.emulator.reconfigure(unhealthy=True)
        wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 503, "router unhealthy")
        assert httpx.get(f"{server.url}/health").json() == {"error": "unhealthy", "error_type": "healthcheck"}
        wait_idle(server.app)
        assert_idle(server.app.router)


@contextlib.contextmanager
def _occupied(url: str) -> Iterator[None]:
    """Takes a server's only permit with a long stream sent straight to it (bypassing the router),
    held until the block ends; then hangs up."""
    with held_stream(url, "/generate_stream", {"inputs": "hold", "parameters": {"max_new_tokens": 1000}}):
        yield


def _one_permit_backend(stack: contextlib.ExitStack) -> tuple[str, Any]:
    app = create_tgi_app(TGIConfig(model_id=MODEL, max_concurrent_requests=1, time_per_output_token_s=0.005))
    return stack.enter_context(serve_in_thread(app)).url, app.state.emulator


def test_overload_inside_a_stream_is_retried_on_another_backend(router: Routers) -> None:
    """TGI reports overload on streaming routes as the first event of an HTTP 200 answer
    (doc/protocols.md §3.4); the router must see it before relaying and try another backend."""
    with contextlib.ExitStack() as stack:
        busy_url, busy = _one_permit_backend(stack)
        free_url, free = _one_permit_backend(stack)
        backends = [{"url": url, "type": "tgi", "models": [MODEL]} for url in (busy_url, free_url)]
        server = router(
            parse_config({"router": {**FAST_FLEET, "strategy": "round_robin"}, "backends": backends})
        )
        hub = InferenceClient(model=server.url)
        chat = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with _occupied(busy_url):
            for _ in range(4):
                tokens = list(hub.text_generation("Hello", max_new_tokens=3, stream=True))
                assert len(tokens) == 3, tokens
                stream = chat.chat.completions.create(
                    model="tgi", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True
                )
                assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            # The busy server did answer overloaded, inside 200 streams, and the router retried.
            assert busy.stats.rejected >= 1, busy.stats
            assert free.stats.rejected == 0
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'irm_routing_decisions_total{result="retry",strategy="round_robin"}' in metrics
        wait_idle(server.app)
        assert_idle(server.app.router)


def test_overload_inside_a_stream_is_relayed_when_no_backend_could_take_it(router: Routers) -> None:
    with contextlib.ExitStack() as stack:
        busy_url, busy = _one_permit_backend(stack)
        backends = [{"url": busy_url, "type": "tgi", "models": [MODEL]}]
        server = router(parse_config({"router": FAST_FLEET, "backends": backends}))
        with _occupied(busy_url):
            body = {"inputs": "Hi", "parameters": {"max_new_tokens": 3}}
            with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=10) as response:
                raw = response.read().decode()
            # The backend's own honest answer: HTTP 200 and the overload event (§3.4).
            assert response.status_code == 200
            assert raw.startswith("data:") and '"error_type":"overloaded"' in raw, raw
            assert busy.stats.rejected == 1
        wait_idle(server.app)
        assert_idle(server.app.router)


@pytest.mark.parametrize(
    ("first_event", "overloaded"),
    [
        (b'data:{"error":"Model is overloaded","error_type":"overloaded"}\n\n', True),
        (b'data: {"error":"Model is overloaded","error_type":"overloaded"}\n\n', True),
        (b'data:{"error":{"message":"Model is overloaded","http_status_code":422}}\n\ndata:[DONE]\n\n', True),
        (b'data:{"index":1,"token":{"id":3,"text":"a"},"generated_text":null}\n\n', False),
        (b'data:{"error":"Input validation error","error_type":"validation"}\n\n', False),
        (b"data:[DONE]\n\n", False),
        (b"data:{not json\n\n", False),
        (b": keep-alive\n\n", False),
        (b"", False),
    ],
)
def test_tgi_adapter_recognizes_an_overload_event(first_event: bytes, overloaded: bool) -> None:
    adapter = TGIAdapter()
    assert adapter.overload_in_stream
    assert adapter.stream_overloaded(first_event) is overloaded
