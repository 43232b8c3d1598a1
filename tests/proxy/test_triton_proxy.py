"""The router in front of Triton emulators, driven by `tritonclient.http`: server and model
readiness (answered from the fleet view / by a backend serving the model), `infer` with the binary
tensor extension on and off (bodies passed through byte for byte), `/generate` and
`/generate_stream` (SSE without `[DONE]`), the repository index, Triton-shaped errors, load signals
from Triton's separate metrics port, and a backend answering 503 (Triton's overload status, as for
"Exceeds maximum queue size") has the request retried on another backend."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http  # type: ignore[import-untyped]
from proxy_support import FAST_FLEET, Routers, RouterServer, backend_status, wait_idle
from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from irmiddleware.proxy import parse_config
from irmiddleware.testing import (
    TritonConfig,
    TritonModel,
    TritonTensor,
    assert_idle,
    create_triton_app,
    serve_in_thread,
    wait_until,
)

MODELS = (
    TritonModel(
        "add", inputs=(TritonTensor("A", "FP32", (4,)),), outputs=(TritonTensor("A1", "FP32", (4,)),)
    ),
    TritonModel.text_generator("llm"),
)


@contextlib.contextmanager
def _tritons(count: int, **config: object) -> Iterator[list[tuple[str, str, object]]]:
    """`count` Triton emulators, each with its metrics app: (url, metrics url, emulator)."""
    with contextlib.ExitStack() as stack:
        started = []
        for _ in range(count):
            app = create_triton_app(TritonConfig(models=MODELS, time_per_request_s=0.0, **config))  # type: ignore[arg-type]
            server = stack.enter_context(serve_in_thread(app))
            metrics = stack.enter_context(serve_in_thread(app.state.metrics_app))
            started.append((server.url, f"{metrics.url}/metrics", app.state.emulator))
        yield started


def _router_for(
    router: Routers, tritons: list[tuple[str, str, object]], models: bool = False
) -> RouterServer:
    backends = [
        {
            "url": url,
            "type": "triton",
            "metrics_url": metrics,
            **({"models": ["add", "llm"]} if models else {}),
        }
        for url, metrics, _emulator in tritons
    ]
    return router(parse_config({"router": FAST_FLEET, "backends": backends}))


def _client(server: RouterServer) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(url=server.url.removeprefix("http://"))  # no scheme (§2.7)


@pytest.mark.slow
@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_through_the_router(router: Routers, binary: bool) -> None:
    with _tritons(2) as tritons:
        server = _router_for(router, tritons)  # models discovered from the repository index
        client = _client(server)
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("add") and client.is_model_ready("llm", "1")
        data = np.array([1.5, 2.0, -3.0, 0.0], dtype=np.float32)
        tensor = triton_http.InferInput("A", [4], "FP32").set_data_from_numpy(data, binary_data=binary)
        output = triton_http.InferRequestedOutput("A1", binary_data=binary)
        result = client.infer("add", [tensor], outputs=[output], request_id="7")
        assert result.as_numpy("A1").tolist() == (data + 1).tolist() and result.get_response()["id"] == "7"
        default = client.infer("add", [tensor])  # tritonclient's default: binary outputs
        assert default.as_numpy("A1").tolist() == (data + 1).tolist()
        with pytest.raises(InferenceServerException, match=r"unknown model|does not exist"):
            client.infer("nope", [tensor])
        wait_idle(server.app)
        assert_idle(server.app.router)


def test_generate_stream_index_and_errors(router: Routers) -> None:
    with _tritons(1) as tritons:
        server = _router_for(router, tritons)
        body = {"text_input": "What is ML?", "max_tokens": 4}
        with httpx.Client(base_url=server.url) as http:
            whole = http.post("/v2/models/llm/generate", json=body).json()
            assert whole["model_name"] == "llm" and whole["text_output"]
            with http.stream("POST", "/v2/models/llm/versions/1/generate_stream", json=body) as response:
                raw = response.read().decode()
            events = [json.loads(part.removeprefix("data: ")) for part in raw.split("\n\n") if part]
            assert "".join(e["text_output"] for e in events) == whole["text_output"] and "[DONE]" not in raw
            index = http.post("/v2/repository/index", json={"ready": True}).json()
            assert sorted(entry["name"] for entry in index) == ["add", "llm"]
            unknown = http.post("/v2/models/nope/infer", json={"inputs": []})
            assert unknown.status_code == 404 and set(unknown.json()) == {"error"}
        wait_idle(server.app)
        assert_idle(server.app.router)


@pytest.mark.slow
def test_metrics_port_signals_and_full_queue_retried(router: Routers) -> None:
    with _tritons(2) as tritons:
        server = _router_for(router, tritons, models=True)
        full_url, _metrics, full = tritons[0]
        wait_until(
            lambda: backend_status(server, full_url)["signals"] is not None, "scraped port 8002 stand-in"
        )
        full.reconfigure(fail_status=503)  # type: ignore[attr-defined]
        data = np.zeros(4, dtype=np.float32)
        tensor = triton_http.InferInput("A", [4], "FP32").set_data_from_numpy(data)
        for _ in range(10):
            assert _client(server).infer("add", [tensor]).as_numpy("A1").tolist() == [1.0] * 4
        wait_idle(server.app)
        assert_idle(server.app.router)
