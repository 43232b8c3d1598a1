"""The TGI emulator speaks Hugging Face TGI's router protocol (doc/protocols.md §3) over real HTTP.

Each test starts a real uvicorn server on 127.0.0.1 and drives it with the official clients
(`huggingface_hub.InferenceClient` for `text_generation` and `chat_completion`, streaming and not;
`openai` against the `/v1` chat endpoint) or raw httpx. They prove: health (200 / 503 with TGI's
body), `/info`'s exact keys, `/v1/models`, `/generate` with `details` and the `x-*` headers,
`/generate_stream` SSE framing without `[DONE]` (with and without the space after `data:`), the
`POST /` compat route returning a JSON array, chat and completions streams ending with `[DONE]`,
422 validation, overload (429 non-streaming; HTTP 200 plus an error event when streaming), and
Prometheus metrics under TGI's names without `_total`. No test asserts a wall-clock duration;
every wait is bounded by a deadline.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from prometheus_client.parser import text_string_to_metric_families

from irmiddleware.testing import (
    RunningServer,
    TGIConfig,
    TGIEmulator,
    create_tgi_app,
    serve_in_thread,
    wait_until,
)

_DEADLINE_S = 5.0
_FAST = {"time_per_request_s": 0.0, "time_per_prompt_token_s": 0.0, "time_per_output_token_s": 0.001}
TGIFactory = Callable[..., tuple[RunningServer, TGIEmulator]]


@pytest.fixture
def tgi_server() -> Iterator[TGIFactory]:
    """Start emulators with `tgi_server(**config_overrides)`; returns (server, emulator)."""
    with contextlib.ExitStack() as stack:

        def start(**overrides: Any) -> tuple[RunningServer, TGIEmulator]:
            app = create_tgi_app(TGIConfig(**{"model_id": "org/m", **_FAST, **overrides}))
            return stack.enter_context(serve_in_thread(app)), app.state.emulator

        yield start


def _events(raw: str, prefix: str = "data: ") -> list[Any]:
    parts = [part for part in raw.split("\n\n") if part]
    assert all(part.startswith(prefix) for part in parts), parts
    return [part.removeprefix(prefix) for part in parts]


def test_config_rejects_bad_values() -> None:
    bad: list[dict[str, Any]] = [
        {"max_concurrent_requests": 0},
        {"max_input_tokens": 10, "max_total_tokens": 10},
        {"time_per_output_token_s": -1.0},
        {"fail_status": 200},
        {"model_id": ""},
    ]
    for values in bad:
        with pytest.raises(ValueError):
            TGIConfig(**values)


def test_health_info_and_models(tgi_server: TGIFactory) -> None:
    server, emulator = tgi_server(max_concurrent_requests=7)
    with httpx.Client(base_url=server.url) as http:
        for path in ("/health", "/", "/ping"):
            assert (http.get(path).status_code, http.get(path).content) == (200, b"")
        info = http.get("/info").json()
        assert list(info) == [
            "model_id",
            "model_sha",
            "model_pipeline_tag",
            "max_concurrent_requests",
            "max_best_of",
            "max_stop_sequences",
            "max_input_tokens",
            "max_total_tokens",
            "validation_workers",
            "max_client_batch_size",
            "router",
            "version",
            "sha",
            "docker_label",
        ]
        assert (info["model_id"], info["max_concurrent_requests"]) == ("org/m", 7)
        assert http.get("/v1/models").json()["data"][0] == {
            "id": "org/m",
            "object": "model",
            "created": 0,
            "owned_by": "org/m",
        }
        emulator.reconfigure(unhealthy=True)
        sick = http.get("/health")
        assert (sick.status_code, sick.json()) == (503, {"error": "unhealthy", "error_type": "healthcheck"})


def test_generate_with_details_and_headers(tgi_server: TGIFactory) -> None:
    server, _ = tgi_server()
    body = {"inputs": "What is DL?", "parameters": {"max_new_tokens": 3, "details": True}}
    response = httpx.post(f"{server.url}/generate", json=body)
    answer = response.json()
    assert answer["details"]["finish_reason"] == "length" and answer["details"]["generated_tokens"] == 3
    assert "".join(token["text"] for token in answer["details"]["tokens"]) == answer["generated_text"]
    for header in ("x-compute-type", "x-total-time", "x-queue-time", "x-time-per-token", "x-inference-time"):
        assert header in response.headers
    assert (response.headers["x-prompt-tokens"], response.headers["x-generated-tokens"]) == ("3", "3")
    plain = httpx.post(f"{server.url}/generate", json={"inputs": "What is DL?"}).json()
    assert "details" not in plain and plain["generated_text"].startswith(answer["generated_text"])


@pytest.mark.parametrize("space", [True, False])
def test_generate_stream_framing(tgi_server: TGIFactory, space: bool) -> None:
    server, _ = tgi_server(sse_space=space)
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 4, "details": True}}
    response = httpx.post(f"{server.url}/generate_stream", json=body)
    assert response.headers["x-accel-buffering"] == "no"
    events = [json.loads(e) for e in _events(response.text, "data: " if space else "data:")]
    assert [e["index"] for e in events] == [1, 2, 3, 4] and "[DONE]" not in response.text
    assert [e["generated_text"] for e in events[:-1]] == [None] * 3 and events[-1]["generated_text"]
    assert events[-1]["details"] == {
        "finish_reason": "length",
        "generated_tokens": 4,
        "seed": None,
        "input_length": 1,
    }


def test_huggingface_hub_text_generation(tgi_server: TGIFactory) -> None:
    server, _ = tgi_server()
    client = InferenceClient(model=server.url)
    text = client.text_generation("Hello", max_new_tokens=5)
    detailed = client.text_generation("Hello", max_new_tokens=5, details=True)
    assert detailed.generated_text == text and detailed.details is not None
    assert detailed.details.generated_tokens == 5
    streamed = list(client.text_generation("Hello", max_new_tokens=5, stream=True))
    assert "".join(streamed) == text
    compat = httpx.post(server.url, json={"inputs": "Hello", "parameters": {"max_new_tokens": 5}})
    assert compat.json() == [{"generated_text": text}]  # POST / answers a JSON array (§3.3).


def test_huggingface_hub_chat_completion(tgi_server: TGIFactory) -> None:
    server, _ = tgi_server()
    client = InferenceClient(model=server.url)
    messages = [{"role": "user", "content": "Hi there"}]
    whole = client.chat_completion(messages, max_tokens=6)
    content = whole.choices[0].message.content
    assert content and whole.usage.completion_tokens == len(content.split())
    pieces = [
        chunk.choices[0].delta.content
        for chunk in client.chat_completion(messages, max_tokens=6, stream=True)
    ]
    assert "".join(p or "" for p in pieces) == content


def test_openai_client_chat_and_completions(tgi_server: TGIFactory) -> None:
    server, _ = tgi_server()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert reply.model == "tgi" and reply.id == "" and reply.system_fingerprint == "3.3.6-dev0-native"
    assert reply.choices[0].finish_reason == "length" and reply.usage is not None
    stream = client.chat.completions.create(
        model="tgi",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    completion = client.completions.create(model="tgi", prompt="Hi", max_tokens=3)
    assert completion.choices[0].text and completion.object == "text_completion"
    raw = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True})
    assert _events(raw.text)[-1] == "[DONE]"


def test_validation_errors_are_422(tgi_server: TGIFactory) -> None:
    server, emulator = tgi_server(max_input_tokens=4, max_total_tokens=8)
    with httpx.Client(base_url=server.url) as http:
        too_long = http.post("/generate", json={"inputs": "one two three four five"})
        assert too_long.status_code == 422 and too_long.json()["error_type"] == "validation"
        too_many = http.post("/generate", json={"inputs": "one", "parameters": {"max_new_tokens": 20}})
        assert too_many.status_code == 422 and "must be <= 8" in too_many.json()["error"]
        assert http.post("/generate", json={"parameters": {}}).status_code == 422
        emulator.reconfigure(fail_status=500)
        failed = http.post("/generate", json={"inputs": "x"})
        assert failed.status_code == 500 and set(failed.json()) == {"error", "error_type"}


def test_a_body_nested_too_deep_is_a_parse_error_not_a_crash(tgi_server: TGIFactory) -> None:
    server, _ = tgi_server()
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    answer = httpx.post(f"{server.url}/v1/chat/completions", content=deep)
    assert answer.status_code == 400 and "Failed to parse" in answer.text


def _hold(url: str) -> tuple[httpx.Client, Iterator[str]]:
    """Start a long stream and wait for its first event: it then holds a permit."""
    client = httpx.Client(timeout=_DEADLINE_S)
    body = {"inputs": "hold", "parameters": {"max_new_tokens": 200}}
    response = client.send(client.build_request("POST", f"{url}/generate_stream", json=body), stream=True)
    lines = response.iter_lines()
    assert next(lines).startswith("data: {")
    return client, lines


def test_overload_is_429_or_an_error_event(tgi_server: TGIFactory) -> None:
    server, emulator = tgi_server(max_concurrent_requests=1, time_per_output_token_s=0.02)
    holder, _ = _hold(server.url)
    try:
        with httpx.Client(base_url=server.url) as http:
            refused = http.post("/generate", json={"inputs": "x"})
            assert (refused.status_code, refused.json()) == (
                429,
                {"error": "Model is overloaded", "error_type": "overloaded"},
            )
            stream = http.post("/generate_stream", json={"inputs": "x"})
            assert stream.status_code == 200  # The permit is taken inside the stream (§3.4).
            assert [json.loads(e) for e in _events(stream.text)] == [
                {"error": "Model is overloaded", "error_type": "overloaded"}
            ]
            chat = {"messages": [{"role": "user", "content": "x"}], "stream": True}
            chat_events = _events(http.post("/v1/chat/completions", json=chat).text)
            assert json.loads(chat_events[0])["error"]["message"] == "Model is overloaded"
            assert chat_events[-1] == "[DONE]"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(
                    base_url=f"{server.url}/v1", api_key="x", max_retries=0
                ).chat.completions.create(model="tgi", messages=[{"role": "user", "content": "x"}])
            samples = _samples(http.get("/metrics").text)
            assert samples["tgi_request_failure"] == [({"err": "overloaded"}, 4.0)]
            assert samples["tgi_batch_current_size"] == [({}, 1.0)]
    finally:
        holder.close()
    assert emulator.stats.rejected == 4


def test_queue_shows_in_metrics(tgi_server: TGIFactory) -> None:
    server, emulator = tgi_server(max_batch_size=1, time_per_output_token_s=0.02)
    holder, _ = _hold(server.url)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            body = {"inputs": "x", "parameters": {"max_new_tokens": 1}}
            queued = pool.submit(httpx.post, f"{server.url}/generate", json=body, timeout=_DEADLINE_S * 3)
            wait_until(lambda: emulator.stats.waiting == 1)
            response = httpx.get(f"{server.url}/metrics")
            assert "_total" not in response.text and "# TYPE tgi_request_count counter" in response.text
            samples = _samples(response.text)
            assert (samples["tgi_queue_size"], samples["tgi_batch_current_size"]) == (
                [({}, 1.0)],
                [({}, 1.0)],
            )
            holder.close()
            assert queued.result(_DEADLINE_S * 3).status_code == 200
    finally:
        holder.close()
    wait_until(lambda: emulator.stats.running == 0)
    samples = _samples(httpx.get(f"{server.url}/metrics").text)
    assert samples["tgi_request_success"] == [({}, 1.0)] and samples["tgi_request_count"] == [({}, 2.0)]
    assert samples["tgi_request_duration"][-1] == ({}, 1.0)  # _count
    assert emulator.stats.aborted == 1


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by family name, parsed with prometheus_client's own parser."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(family.name, []).append((sample.labels, sample.value))
    return out


def test_api_key_guards_inference_routes_only(tgi_server: TGIFactory) -> None:
    server, _ = tgi_server(api_key="k")
    with httpx.Client(base_url=server.url) as http:
        denied = http.post("/generate", json={"inputs": "x"})
        assert (denied.status_code, denied.content) == (401, b"")
        assert http.get("/info").status_code == 200 and http.get("/health").status_code == 200
        allowed = http.post("/generate", json={"inputs": "x"}, headers={"Authorization": "Bearer k"})
        assert allowed.status_code == 200


def test_startup_delay_refuses_connections_until_listening() -> None:
    app = create_tgi_app(startup_delay_s=0.3)
    with serve_in_thread(app) as server:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health")
        server.wait_started()
        assert httpx.get(f"{server.url}/health").status_code == 200
