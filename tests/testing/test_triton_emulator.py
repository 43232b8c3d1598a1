"""The Triton emulator speaks Triton's HTTP protocol (doc/protocols.md §2) over real HTTP.

Each test starts a real uvicorn server on 127.0.0.1 and drives it with the official
`tritonclient.http` client or raw httpx. They prove: health and readiness (200 / 400 with empty
bodies, strict readiness, model readiness), model metadata and config, `infer` with JSON tensors
and with the binary tensor extension in both directions (FP32, INT32, BYTES; `tritonclient` uses
binary by default), Triton's error bodies and statuses (unknown model, unmatched path, wrong
method, bad input), the generate / generate_stream extension (SSE without `[DONE]`, errors after
the start as events), the repository index, the dynamic batcher's bounded queue answering 503
"Exceeds maximum queue size", and Prometheus metrics under Triton's names (no `_total`) on a
separate metrics app. No test asserts a wall-clock duration; every wait is bounded by a deadline.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from irmiddleware.testing import (
    RunningServer,
    TritonConfig,
    TritonEmulator,
    TritonModel,
    TritonTensor,
    create_triton_app,
    create_triton_metrics_app,
    serve_in_thread,
    wait_until,
)

_DEADLINE_S = 5.0
_FAST = {"time_per_request_s": 0.0, "time_per_token_s": 0.001}
_MODELS = (
    TritonModel(
        "add",
        inputs=(
            TritonTensor("A", "FP32", (4,)),
            TritonTensor("B", "INT32", (4,), optional=True),
            TritonTensor("S", "BYTES", (2,), optional=True),
        ),
        outputs=(
            TritonTensor("A1", "FP32", (4,)),
            TritonTensor("B1", "INT32", (4,)),
            TritonTensor("S1", "BYTES", (2,)),
        ),
        max_batch_size=8,
        versions=("1", "2"),
    ),
    TritonModel.text_generator("llm"),
)
TritonFactory = Callable[..., tuple[RunningServer, TritonEmulator]]


@pytest.fixture
def triton_server() -> Iterator[TritonFactory]:
    """Start emulators with `triton_server(**config_overrides)`; returns (server, emulator)."""
    with contextlib.ExitStack() as stack:

        def start(**overrides: Any) -> tuple[RunningServer, TritonEmulator]:
            app = create_triton_app(TritonConfig(**{"models": _MODELS, **_FAST, **overrides}))
            return stack.enter_context(serve_in_thread(app)), app.state.emulator

        yield start


def _client(server: RunningServer) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(url=f"127.0.0.1:{server.port}")  # No scheme (§2.7).


def _inputs(binary: bool) -> list[triton_http.InferInput]:
    arrays = [
        np.array([[1.5, 2.0, -3.0, 0.0]], dtype=np.float32),
        np.array([[1, 2, 2147483647, -5]], dtype=np.int32),
        np.array([[b"hello", "wörld".encode()]], dtype=np.object_),
    ]
    inputs = []
    for name, datatype, array in zip("ABS", ("FP32", "INT32", "BYTES"), arrays, strict=True):
        tensor = triton_http.InferInput(name, list(array.shape), datatype)
        inputs.append(tensor.set_data_from_numpy(array, binary_data=binary))
    return inputs


def test_config_rejects_bad_values() -> None:
    bad: list[Callable[[], object]] = [
        lambda: TritonConfig(models=()),
        lambda: TritonConfig(models=(TritonModel("x"), TritonModel("x"))),
        lambda: TritonConfig(time_per_token_s=-1),
        lambda: TritonConfig(fail_status=200),
        lambda: TritonModel("x", max_concurrency=0),
        lambda: TritonModel("x", versions=("v1",)),
        lambda: TritonTensor("t", "FLOAT", (1,)),
        lambda: TritonModel("x", outputs=(TritonTensor("O", "INT32", (16,)),)),  # FP32 input
    ]
    for make in bad:
        with pytest.raises(ValueError):
            make()


def test_health_readiness_and_metadata(triton_server: TritonFactory) -> None:
    server, emulator = triton_server()
    client = _client(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("add") and client.is_model_ready("add", "2")
    assert client.get_server_metadata()["name"] == "triton"
    metadata = client.get_model_metadata("add")
    assert metadata["versions"] == ["1", "2"]
    assert metadata["inputs"][0] == {"name": "A", "datatype": "FP32", "shape": [-1, 4]}
    assert client.get_model_config("add")["max_batch_size"] == 8
    emulator.reconfigure(unready_models=("llm",))
    assert not client.is_server_ready() and client.is_server_live() and not client.is_model_ready("llm")
    ready = httpx.get(f"{server.url}/v2/health/ready")
    assert (ready.status_code, ready.content) == (400, b"")
    emulator.reconfigure(unready_models=(), unhealthy=True)
    assert not client.is_server_live()


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_infer_with_tritonclient(triton_server: TritonFactory, binary_in: bool, binary_out: bool) -> None:
    server, _ = triton_server()
    outputs = [triton_http.InferRequestedOutput(name, binary_data=binary_out) for name in ("A1", "B1", "S1")]
    result = _client(server).infer("add", _inputs(binary_in), outputs=outputs, request_id="7")
    np.testing.assert_array_equal(result.as_numpy("A1"), np.array([[2.5, 3.0, -2.0, 1.0]], np.float32))
    # INT32 wraps like the C type Triton computes in.
    np.testing.assert_array_equal(result.as_numpy("B1"), np.array([[2, 3, -2147483648, -4]], np.int32))
    # As JSON, BYTES elements come back as str (tritonclient does not re-encode them).
    strings = [
        [s if isinstance(s, bytes) else s.encode() for s in row] for row in result.as_numpy("S1").tolist()
    ]
    assert strings == [[b"hello", "wörld".encode()]]
    response = result.get_response()
    assert (response["id"], response["model_name"], response["model_version"]) == ("7", "add", "2")


def test_default_infer_uses_binary_outputs(triton_server: TritonFactory) -> None:
    server, _ = triton_server()
    # No outputs requested: tritonclient sets binary_data_output (doc/protocols.md §2.3).
    result = _client(server).infer("add", _inputs(True), model_version="1")
    assert result.get_output("A1")["parameters"]["binary_data_size"] == 16
    assert result.as_numpy("B1").tolist() == [[2, 3, -2147483648, -4]]


def test_infer_json_over_raw_http_and_generative_infer(triton_server: TritonFactory) -> None:
    server, _ = triton_server()
    body = {"inputs": [{"name": "A", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2, 3, 4]]}]}
    with httpx.Client(base_url=server.url) as http:
        answer = http.post("/v2/models/add/infer", json={**body, "outputs": [{"name": "A1"}]})
        assert answer.json() == {
            "model_name": "add",
            "model_version": "2",
            "outputs": [{"name": "A1", "datatype": "FP32", "shape": [1, 4], "data": [2.0, 3.0, 4.0, 5.0]}],
        }
        assert "id" not in answer.json() and "inference-header-content-length" not in answer.headers
    text = triton_http.InferInput("text_input", [1], "BYTES").set_data_from_numpy(
        np.array([b"hi"], np.object_)
    )
    result = _client(server).infer("llm", [text])
    assert result.as_numpy("text_output")[0].decode().split()  # Filler words.


def test_errors_have_triton_shape(triton_server: TritonFactory) -> None:
    server, _ = triton_server()
    with httpx.Client(base_url=server.url) as http:
        unknown = http.post("/v2/models/nope/infer", json={"inputs": []})
        assert (unknown.status_code, unknown.json()) == (
            404,
            {"error": "Request for unknown model: 'nope' is not found"},
        )
        assert http.get("/v2/models/add/versions/9").status_code == 404
        assert (http.get("/v2/nowhere").status_code, http.get("/v2/nowhere").json()) == (
            404,
            {"error": "Not Found"},
        )
        assert http.get("/v2/models/add/infer").status_code == 405
        bad_type = {"inputs": [{"name": "A", "shape": [1, 4], "datatype": "INT32", "data": [1, 2, 3, 4]}]}
        wrong = http.post("/v2/models/add/infer", json=bad_type)
        assert wrong.status_code == 400 and "data-type is 'INT32'" in wrong.json()["error"]
        shape = http.post(
            "/v2/models/add/infer",
            json={"inputs": [{**bad_type["inputs"][0], "datatype": "FP32", "shape": [4]}]},
        )
        assert shape.status_code == 400 and "unexpected shape" in shape.json()["error"]
    with pytest.raises(InferenceServerException, match="unknown model"):
        _client(server).infer("nope", _inputs(True))


def test_generate_and_generate_stream(triton_server: TritonFactory) -> None:
    server, _ = triton_server(stream_error_after_tokens=None)
    body = {"id": "42", "text_input": "What is ML?", "max_tokens": 5, "parameters": {"temperature": 0}}
    with httpx.Client(base_url=server.url) as http:
        whole = http.post("/v2/models/llm/generate", json=body).json()
        assert {k: whole[k] for k in ("id", "model_name", "model_version")} == {
            "id": "42",
            "model_name": "llm",
            "model_version": "1",
        }
        with http.stream("POST", "/v2/models/llm/generate_stream", json=body) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            raw = response.read().decode()
    events = [json.loads(part.removeprefix("data: ")) for part in raw.split("\n\n") if part]
    assert all(part.startswith("data: {") for part in raw.split("\n\n") if part) and "[DONE]" not in raw
    assert "".join(event["text_output"] for event in events) == whole["text_output"]
    assert len(whole["text_output"].split()) <= 5


def test_stream_error_after_start_is_an_event(triton_server: TritonFactory) -> None:
    server, emulator = triton_server(stream_error_after_tokens=2)
    body = {"text_input": "x", "max_tokens": 8}
    response = httpx.post(f"{server.url}/v2/models/llm/generate_stream", json=body)
    events = [json.loads(line.removeprefix("data: ")) for line in response.text.split("\n\n") if line]
    assert response.status_code == 200 and len(events) == 3 and "error" in events[-1]
    assert emulator.stats.failed == 1


def test_repository_index(triton_server: TritonFactory) -> None:
    server, _ = triton_server(unready_models=("llm",))
    with httpx.Client(base_url=server.url) as http:
        everything = http.post("/v2/repository/index").json()
        assert {"name": "llm", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in everything
        assert http.post("/v2/repository/index", json={"ready": True}).json() == [
            {"name": "add", "version": "1", "state": "READY"},
            {"name": "add", "version": "2", "state": "READY"},
        ]
        assert http.post("/v2/repository/index", json={"ready": "yes"}).status_code == 400
        assert http.post("/v2/repository/models/llm/load").status_code == 200
        assert len(http.post("/v2/repository/index", json={"ready": True}).json()) == 3


@pytest.mark.slow
def test_full_queue_answers_503_and_metrics_show_the_queue(triton_server: TritonFactory) -> None:
    slow = TritonModel.text_generator("llm", max_queue_size=1)
    server, emulator = triton_server(models=(slow,), time_per_token_s=0.05)
    body = {"text_input": "x", "max_tokens": 40}
    url = f"{server.url}/v2/models/llm/generate"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, url, json=body, timeout=_DEADLINE_S * 2)
        wait_until(lambda: emulator.stats.running == 1)
        second = pool.submit(httpx.post, url, json=body, timeout=_DEADLINE_S * 2)
        wait_until(lambda: emulator.stats.waiting == 1)
        rejected = httpx.post(url, json={**body, "id": "r1"})
        assert (rejected.status_code, rejected.json()) == (
            503,
            {"error": "[request id: r1] Exceeds maximum queue size"},
        )
        with serve_in_thread(create_triton_metrics_app(emulator)) as metrics:
            samples = _samples(httpx.get(f"{metrics.url}/metrics").text)
        assert samples["nv_inference_pending_request_count"] == [({"model": "llm", "version": "1"}, 1.0)]
        assert ({"model": "llm", "version": "1", "reason": "REJECTED"}, 1.0) in samples[
            "nv_inference_request_failure"
        ]
        assert (
            first.result(_DEADLINE_S * 2).status_code == 200
            and second.result(_DEADLINE_S * 2).status_code == 200
        )


def test_metrics_names_have_no_total_suffix(triton_server: TritonFactory) -> None:
    server, emulator = triton_server()
    _client(server).infer("add", _inputs(True), model_version="1")
    with serve_in_thread(create_triton_metrics_app(emulator)) as metrics:
        response = httpx.get(f"{metrics.url}/metrics")
        assert httpx.get(f"{metrics.url}/v2/health/live").status_code == 404  # Metrics only.
    assert "_total" not in response.text and "# TYPE nv_inference_request_success counter" in response.text
    samples = _samples(response.text)
    success = {
        (labels["model"], labels["version"]): value
        for labels, value in samples["nv_inference_request_success"]
    }
    assert success == {("add", "1"): 1.0, ("add", "2"): 0.0, ("llm", "1"): 0.0}
    assert samples["nv_inference_exec_count"][0] == ({"model": "add", "version": "1"}, 1.0)
    assert samples["nv_inference_count"][0][1] == 1.0  # Batch of one.


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by family name, parsed with prometheus_client's parser (which names counter
    samples `<family>_total` whatever the text says)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(family.name, []).append((sample.labels, sample.value))
    return out


def test_startup_delay_refuses_connections_until_listening() -> None:
    app = create_triton_app(startup_delay_s=0.3)
    with serve_in_thread(app) as server:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/v2/health/live")
        server.wait_started()
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
