"""One router in front of vLLM, TGI and Triton emulators routes by model first, whatever the order of
the configuration: each client (`openai`, `huggingface_hub.InferenceClient`, a `text_generation`-
style client over httpx, `tritonclient.http`) is served by the backend of the model it names (or,
for TGI's base-model names and native routes, by the TGI backend), as the emulators' own request
counts show; an unknown model, or a model of another protocol, gets 404 in the client's protocol
and reaches no backend; `/v1/models` lists only what OpenAI clients can reach, Triton's index only
Triton's models."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton_http  # type: ignore[import-untyped]
from huggingface_hub import InferenceClient
from proxy_support import FAST_FLEET, Routers, RouterServer, wait_idle
from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from irmiddleware.proxy import create_app, parse_config
from irmiddleware.testing import (
    TGIConfig,
    TritonConfig,
    TritonModel,
    TritonTensor,
    assert_idle,
    create_tgi_app,
    create_triton_app,
    create_vllm_app,
    serve_in_thread,
)

VLLM_MODEL = "org/vllm-model"
TGI_MODEL = "org/tgi-model"
TRITON_MODELS = (
    TritonModel(
        "add", inputs=(TritonTensor("A", "FP32", (4,)),), outputs=(TritonTensor("A1", "FP32", (4,)),)
    ),
    TritonModel.text_generator("llm"),
)
ORDERS = [("vllm", "tgi", "triton"), ("triton", "tgi", "vllm")]
CHAT = [{"role": "user", "content": "Hi"}]


class Emulated:
    """The three emulators (by type), their URLs, and the router in front of them."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        fast = {"time_per_request_s": 0.0, "time_per_output_token_s": 0.001}
        vllm = create_vllm_app(served_model_names=(VLLM_MODEL,), **fast)
        tgi = create_tgi_app(TGIConfig(model_id=TGI_MODEL, time_per_output_token_s=0.001))
        triton = create_triton_app(TritonConfig(models=TRITON_MODELS, time_per_request_s=0.0))
        self.apps = {"vllm": vllm, "tgi": tgi, "triton": triton}
        self.urls = {kind: stack.enter_context(serve_in_thread(app)).url for kind, app in self.apps.items()}
        self.triton_metrics = stack.enter_context(serve_in_thread(triton.state.metrics_app)).url + "/metrics"

    def backends(self, order: tuple[str, ...]) -> list[dict[str, Any]]:
        """Backends in `order`, their models discovered from the servers."""
        extra = {"triton": {"metrics_url": self.triton_metrics}}
        return [{"url": self.urls[kind], "type": kind, **extra.get(kind, {})} for kind in order]

    def received(self) -> dict[str, int]:
        return {kind: app.state.emulator.stats.received for kind, app in self.apps.items()}


@contextlib.contextmanager
def _mixed(router: Routers, order: tuple[str, ...]) -> Iterator[tuple[Emulated, RouterServer]]:
    with contextlib.ExitStack() as stack:
        fleet = Emulated(stack)
        server = router(parse_config({"router": FAST_FLEET, "backends": fleet.backends(order)}))
        yield fleet, server
        wait_idle(server.app)
        assert_idle(server.app.router)


@contextlib.contextmanager
def _served_by(fleet: Emulated, kind: str | None, count: int = 1) -> Iterator[None]:
    """Asserts that the block's requests reached `count` times the `kind` backend and no other
    (`kind` None: no backend at all)."""
    before = fleet.received()
    yield
    after = fleet.received()
    expected = {name: before[name] + (count if name == kind else 0) for name in before}
    assert after == expected, f"expected {count} request(s) on {kind}: before {before}, after {after}"


@pytest.mark.slow  # four servers and a router per order
@pytest.mark.parametrize("order", ORDERS, ids="-".join)
def test_openai_client_is_served_by_the_model_named(router: Routers, order: tuple[str, ...]) -> None:
    with _mixed(router, order) as (fleet, server):
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        for model, kind in ((VLLM_MODEL, "vllm"), (TGI_MODEL, "tgi"), ("tgi", "tgi")):
            with _served_by(fleet, kind):
                reply = client.chat.completions.create(model=model, messages=CHAT, max_tokens=3)  # type: ignore[arg-type]
                assert reply.choices[0].message.content
            with _served_by(fleet, kind):
                stream = client.chat.completions.create(model=model, messages=CHAT, max_tokens=3, stream=True)  # type: ignore[arg-type]
                assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        with _served_by(fleet, "vllm"):
            assert client.completions.create(model=VLLM_MODEL, prompt="Hi", max_tokens=3).choices[0].text
        for unknown in ("nope", "add", "llm"):  # Triton's models are not OpenAI models
            with (
                _served_by(fleet, None),
                pytest.raises(openai.NotFoundError, match=f"`{unknown}` does not exist"),
            ):
                client.chat.completions.create(model=unknown, messages=CHAT, max_tokens=3)  # type: ignore[arg-type]
        assert [m.id for m in client.models.list()] == sorted([TGI_MODEL, VLLM_MODEL])


@pytest.mark.slow  # four servers and a router per order
@pytest.mark.parametrize("order", ORDERS, ids="-".join)
def test_tgi_clients_reach_the_tgi_backend(router: Routers, order: tuple[str, ...]) -> None:
    with _mixed(router, order) as (fleet, server):
        hub = InferenceClient(model=server.url)
        with _served_by(fleet, "tgi"):
            assert hub.chat_completion(CHAT, max_tokens=4).choices[0].message.content  # model "dummy"
        with _served_by(fleet, "tgi"):
            assert hub.text_generation("Hello", max_new_tokens=4)  # POST / (the compat route)
        with _served_by(fleet, "tgi"):
            assert list(hub.text_generation("Hello", max_new_tokens=4, stream=True))
        # What `text_generation.Client` sends: /generate, /generate_stream, and chat as "tgi".
        with httpx.Client(base_url=server.url, timeout=10) as http:
            body = {"inputs": "Hi", "parameters": {"max_new_tokens": 3}}
            with _served_by(fleet, "tgi"):
                assert http.post("/generate", json=body).json()["generated_text"]
            with _served_by(fleet, "tgi"), http.stream("POST", "/generate_stream", json=body) as response:
                assert response.read().startswith(b"data:")
            with _served_by(fleet, "tgi"):
                chat = http.post(
                    "/v1/chat/completions", json={"model": "tgi", "messages": CHAT, "max_tokens": 3}
                )
                assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
            with _served_by(fleet, None):
                unknown = http.post("/v1/chat/completions", json={"model": "typo", "messages": CHAT})
            assert unknown.status_code == 404 and "`typo` does not exist" in unknown.text
            assert http.get("/info").json()["model_id"] == TGI_MODEL
            assert http.get("/health").status_code == 200


@pytest.mark.slow  # four servers and a router per order
@pytest.mark.parametrize("order", ORDERS, ids="-".join)
def test_tritonclient_reaches_the_triton_backend(router: Routers, order: tuple[str, ...]) -> None:
    with _mixed(router, order) as (fleet, server):
        client = triton_http.InferenceServerClient(url=server.url.removeprefix("http://"))
        assert client.is_server_ready() and client.is_model_ready("add")
        data = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
        tensor = triton_http.InferInput("A", [4], "FP32").set_data_from_numpy(data)
        with _served_by(fleet, "triton"):
            assert client.infer("add", [tensor]).as_numpy("A1").tolist() == (data + 1).tolist()
        for other in ("nope", VLLM_MODEL.replace("/", "%2F")):
            with _served_by(fleet, None), pytest.raises(InferenceServerException, match="does not exist"):
                client.infer(other, [tensor])
        with httpx.Client(base_url=server.url) as http:
            index = http.post("/v2/repository/index", json={"ready": True}).json()
            assert sorted(entry["name"] for entry in index) == ["add", "llm"]


@pytest.mark.slow  # three servers per order
@pytest.mark.parametrize("order", [("vllm", "tgi"), ("tgi", "vllm")], ids="-".join)
def test_a_model_discovered_on_two_types_keeps_one_whatever_the_order(
    router: Routers, order: tuple[str, ...]
) -> None:
    """Discovery finds "shared" on a vLLM and a TGI server: a pool speaks one protocol, so one type
    keeps it (most backends, then the first type name: here "tgi"), in either order."""
    with contextlib.ExitStack() as stack:
        apps = {
            "vllm": create_vllm_app(served_model_names=("shared",), time_per_output_token_s=0.001),
            "tgi": create_tgi_app(TGIConfig(model_id="shared", time_per_output_token_s=0.001)),
        }
        urls = {kind: stack.enter_context(serve_in_thread(app)).url for kind, app in apps.items()}
        backends = [{"url": urls[kind], "type": kind} for kind in order]
        # Round robin would alternate between the two servers of a pool that had both.
        config = parse_config({"router": {**FAST_FLEET, "strategy": "round_robin"}, "backends": backends})
        server = router(config)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        for _ in range(3):
            client.chat.completions.create(model="shared", messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
        assert apps["tgi"].state.emulator.stats.received == 3
        assert apps["vllm"].state.emulator.stats.received == 0
        wait_idle(server.app)
        assert_idle(server.app.router)


@pytest.mark.parametrize("order", ORDERS, ids="-".join)
def test_what_no_backend_serves_is_404_in_the_clients_protocol(order: tuple[str, ...]) -> None:
    """The rule alone, without servers (configured models, no checks): nothing here reaches a
    backend, so nothing needs one."""
    models = {"vllm": ["v"], "tgi": ["t"], "triton": ["add"]}
    backends = [
        {"url": f"http://127.0.0.1:{9 + i}", "type": k, "models": models[k]} for i, k in enumerate(order)
    ]
    quiet = {"health": {"enabled": False}, "signals": {"enabled": False}}
    app = create_app(parse_config({"router": quiet, "backends": backends}))

    async def answers() -> dict[str, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://router") as http:
            chat = {"messages": CHAT}
            return {
                "models": await http.get("/v1/models"),
                "index": await http.post("/v2/repository/index", json={}),
                "unknown": await http.post("/v1/chat/completions", json={"model": "nope", **chat}),
                "triton model": await http.post("/v1/chat/completions", json={"model": "add", **chat}),
                "vllm model on triton": await http.post("/v2/models/v/infer", json={"inputs": []}),
                "tgi health": await http.get("/health"),
            }

    try:
        got = asyncio.run(answers())
        asyncio.run(app.aclose())
    finally:
        app.close()
    assert [card["id"] for card in got["models"].json()["data"]] == ["t", "v"]
    assert [entry["name"] for entry in got["index"].json()] == ["add"]
    for name, model in (("unknown", "nope"), ("triton model", "add")):
        error = got[name].json()["error"]  # OpenAI's shape: vLLM's adapter answers first on /v1
        assert got[name].status_code == 404 and error["message"] == f"The model `{model}` does not exist."
    assert got["vllm model on triton"].status_code == 404
    assert got["vllm model on triton"].json() == {"error": "The model `v` does not exist."}
    assert got["tgi health"].status_code == 200
