"""The vLLM emulator speaks vLLM's protocol (doc/protocols.md §1) over real HTTP.

Each test starts a real uvicorn server on 127.0.0.1 and drives it with httpx or the official
`openai` client. They prove: the plain endpoints and model cards, completion/chat/embedding bodies
and usage, SSE streaming framing, vLLM's error shapes, bearer auth, the `max_num_seqs` limit really
queueing (and 503 when the bounded queue is full), Prometheus metrics under vLLM's names, and the
fault knobs (fail_status, unhealthy, die_after_tokens, kill, startup delay). No test asserts a
wall-clock duration; every wait is bounded by a deadline.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import struct
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

import irmiddleware.testing
from irmiddleware.testing import (
    RunningServer,
    VLLMConfig,
    VLLMEmulator,
    count_tokens,
    create_vllm_app,
    serve_in_thread,
    wait_until,
)

# The `vllm_server` fixture (conftest.py): start an emulator with config overrides.
VLLMFactory = Callable[..., tuple[RunningServer, VLLMEmulator]]
_DEADLINE_S = 5.0
_CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello there"}]


def _client(url: str, api_key: str = "unused") -> openai.OpenAI:
    # No retries: the tests look at the emulator's first answer, and retries would hide it.
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Metric samples by sample name, parsed with prometheus_client's own parser."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def _gauge(url: str, name: str) -> float:
    [(labels, value)] = _samples(httpx.get(f"{url}/metrics").text)[name]
    assert labels == {"model_name": "m", "engine": "0"}
    return value


def test_public_api_is_pinned() -> None:
    assert irmiddleware.testing.__all__ == [
        "EmulatorStats",
        "PrefixCache",
        "RunningServer",
        "TGIConfig",
        "TGIEmulator",
        "TritonConfig",
        "TritonEmulator",
        "TritonModel",
        "TritonTensor",
        "VLLMConfig",
        "VLLMEmulator",
        "assert_idle",
        "block_hashes",
        "count_tokens",
        "create_tgi_app",
        "create_triton_app",
        "create_triton_metrics_app",
        "create_vllm_app",
        "serve_in_thread",
        "wait_until",
    ]


def test_config_rejects_bad_values() -> None:
    bad_values: list[dict[str, Any]] = [
        {"max_num_seqs": 0},
        {"served_model_names": ()},
        {"time_per_output_token_s": -1.0},
        {"output_tokens_range": (5, 2)},
        {"fail_status": 200},
        {"max_num_queued_reqs": -1},
    ]
    for bad in bad_values:
        with pytest.raises(ValueError):
            VLLMConfig(**bad)


def test_plain_endpoints_and_health_fault(vllm_server: VLLMFactory) -> None:
    server, emulator = vllm_server(version="0.10.2")
    with httpx.Client(base_url=server.url) as http:
        health = http.get("/health")
        assert (health.status_code, health.content) == (200, b"")
        assert http.get("/ping").status_code == 200 and http.post("/ping").status_code == 200
        assert http.get("/version").json() == {"version": "0.10.2"}
        assert http.get("/load").json() == {"server_load": 0}
        emulator.config.unhealthy = True
        health = http.get("/health")
        assert (health.status_code, health.content) == (503, b"")
        assert http.post("/ping").status_code == 503


def test_models_list_has_vllm_model_cards(vllm_server: VLLMFactory) -> None:
    server, _ = vllm_server(served_model_names=("m", "alias"), max_model_len=4096)
    assert [model.id for model in _client(server.url).models.list()] == ["m", "alias"]
    body = httpx.get(f"{server.url}/v1/models").json()
    assert body["object"] == "list"
    card = body["data"][1]
    expected = {"id": "alias", "object": "model", "owned_by": "vllm", "root": "m", "parent": None}
    assert {key: card[key] for key in expected} == expected and card["max_model_len"] == 4096
    [permission] = card["permission"]
    assert permission["object"] == "model_permission" and permission["id"].startswith("modelperm-")
    assert permission["allow_sampling"] is True and permission["organization"] == "*"


def test_chat_completion_body_and_usage(vllm_server: VLLMFactory) -> None:
    server, _ = vllm_server()
    client = _client(server.url)
    short = client.chat.completions.create(
        model="m",
        messages=_CHAT,
        max_tokens=3,
        extra_headers={"X-Request-Id": "req-1"},
    )
    assert short.id == "chatcmpl-req-1" and short.object == "chat.completion" and short.model == "m"
    assert short.choices[0].finish_reason == "length" and short.choices[0].message.role == "assistant"
    assert short.usage is not None and short.usage.completion_tokens == 3
    assert short.usage.prompt_tokens == count_tokens("user: Hello there\nassistant:")
    assert short.usage.total_tokens == short.usage.prompt_tokens + 3
    assert count_tokens(short.choices[0].message.content or "") == 3
    full = client.chat.completions.create(model="m", messages=_CHAT, max_tokens=1000)
    assert full.choices[0].finish_reason == "stop" and full.usage is not None
    assert 16 <= full.usage.completion_tokens <= 64  # The default natural answer length range.


def test_completion_body_batch_and_determinism(vllm_server: VLLMFactory) -> None:
    server, _ = vllm_server()
    client = _client(server.url)
    first = client.completions.create(model="m", prompt=["Hello world", "Bye"], max_tokens=4)
    again = client.completions.create(model="m", prompt=["Hello world", "Bye"], max_tokens=4)
    assert first.id.startswith("cmpl-") and first.object == "text_completion"
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert all(c.finish_reason == "length" and c.text.startswith(" ") for c in first.choices)
    assert first.usage is not None and first.usage.prompt_tokens == 4 + 1
    assert first.usage.completion_tokens == 8


def test_chat_stream_sends_role_tokens_usage_and_done(vllm_server: VLLMFactory) -> None:
    server, _ = vllm_server()
    stream = _client(server.url).chat.completions.create(
        model="m",
        messages=_CHAT,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    token_chunks = chunks[1:-1]
    assert len(token_chunks) == 5 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert [c.choices[0].finish_reason for c in token_chunks] == [None] * 4 + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5


def test_completion_stream_is_sse_framed_one_token_per_event(vllm_server: VLLMFactory) -> None:
    server, _ = vllm_server()
    body = {"model": "m", "prompt": "Hi", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert len(payloads) == 4 and all("usage" not in p for p in payloads)
    assert all(p["object"] == "text_completion" and len(p["choices"]) == 1 for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_chunks_arrive_one_by_one(vllm_server: VLLMFactory) -> None:
    # Reading the first event while the server still holds later ones proves there is no buffering.
    server, emulator = vllm_server(time_per_output_token_s=0.05)
    body = {"model": "m", "prompt": "Hi", "max_tokens": 50, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        lines = response.iter_lines()  # Keep it: dropping a half-read iterator closes the connection.
        assert next(lines).startswith("data: {")
        assert emulator.stats.running == 1 and emulator.stats.completed == 0


def test_embeddings_float_and_base64(vllm_server: VLLMFactory) -> None:
    server, _ = vllm_server(embedding=True, embedding_dim=8)
    # The openai client asks for base64 on the wire and decodes it.
    result = _client(server.url).embeddings.create(model="m", input=["one two", "three"])
    assert [item.index for item in result.data] == [0, 1] and len(result.data[0].embedding) == 8
    assert result.usage.prompt_tokens == 2 + 2  # "three" is two 4-character pieces.
    url = f"{server.url}/v1/embeddings"
    raw = httpx.post(url, json={"model": "m", "input": "one two"}, headers={"X-Request-Id": "e1"}).json()
    assert raw["id"] == "embd-e1" and raw["object"] == "list" and raw["data"][0]["object"] == "embedding"
    assert raw["usage"] == {"prompt_tokens": 2, "total_tokens": 2, "completion_tokens": 0}
    assert raw["data"][0]["embedding"] == pytest.approx(result.data[0].embedding, abs=1e-6)
    assert sum(v * v for v in raw["data"][0]["embedding"]) == pytest.approx(1.0)
    b64 = httpx.post(url, json={"input": "one two", "encoding_format": "base64"}).json()
    decoded = struct.unpack("<8f", base64.b64decode(b64["data"][0]["embedding"]))
    assert decoded == pytest.approx(raw["data"][0]["embedding"], abs=1e-6)


def test_errors_have_vllm_shape(vllm_server: VLLMFactory) -> None:
    server, emulator = vllm_server(max_model_len=64)
    url = f"{server.url}/v1/chat/completions"
    unknown = httpx.post(url, json={"model": "x", "messages": _CHAT})
    assert unknown.status_code == 404
    message = "The model `x` does not exist."
    error = {"message": message, "type": "NotFoundError", "param": "model", "code": 404}
    assert unknown.json() == {"error": error}
    bad_bodies = [
        b"{not json",
        b"[1]",
        json.dumps({"model": "m"}).encode(),  # No messages.
        json.dumps({"messages": _CHAT, "max_tokens": "many"}).encode(),
        json.dumps({"messages": _CHAT, "priority": 1}).encode(),  # No priority scheduling.
        json.dumps({"messages": _CHAT, "max_tokens": 100}).encode(),  # Beyond max_model_len.
    ]
    for bad in bad_bodies:
        response = httpx.post(url, content=bad, headers={"content-type": "application/json"})
        assert response.status_code == 400, bad
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("BadRequestError", 400) and error["message"]
    embed = httpx.post(f"{server.url}/v1/embeddings", json={"model": "m", "input": "x"})
    assert embed.status_code == 400 and "does not support Embeddings API" in embed.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        _client(server.url).completions.create(model="nope", prompt="x")
    assert emulator.stats.failed == emulator.stats.received == 9


def test_priority_allowed_with_priority_scheduling(vllm_server: VLLMFactory) -> None:
    server, _ = vllm_server(priority_scheduling=True)
    response = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1, "priority": -5}
    )
    assert response.status_code == 200


def test_api_key_guards_v1_paths_only(vllm_server: VLLMFactory) -> None:
    server, _ = vllm_server(api_key="sekret")
    denied = httpx.get(f"{server.url}/v1/models")
    assert (denied.status_code, denied.json()) == (401, {"error": "Unauthorized"})
    assert httpx.get(f"{server.url}/health").status_code == 200
    models = _client(server.url, "sekret").models.list()
    assert [model.id for model in models] == ["m"]


def test_fail_status_flips_at_runtime(vllm_server: VLLMFactory) -> None:
    server, emulator = vllm_server()
    body = {"model": "m", "prompt": "x", "max_tokens": 1}
    assert httpx.post(f"{server.url}/v1/completions", json=body).status_code == 200
    emulator.reconfigure(fail_status=500)
    failed = httpx.post(f"{server.url}/v1/completions", json=body)
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "InternalServerError"
    with pytest.raises(openai.InternalServerError):
        _client(server.url).completions.create(model="m", prompt="x", max_tokens=1)
    emulator.reconfigure(fail_status=None)
    assert httpx.post(f"{server.url}/v1/completions", json=body).status_code == 200


def _hold_slot(url: str) -> tuple[httpx.Response, Iterator[str]]:
    """Open a long stream and read its first event, so the request is surely running.

    Returns the response and its line iterator; dropping a half-read httpx iterator would close the
    connection, so the caller keeps both alive and calls `response.close()` to let go of the slot.
    """
    body = {"model": "m", "prompt": "hold", "max_tokens": 400, "ignore_eos": True, "stream": True}
    client = httpx.Client(timeout=_DEADLINE_S)
    response = client.send(client.build_request("POST", f"{url}/v1/completions", json=body), stream=True)
    lines = response.iter_lines()
    assert next(lines).startswith("data: {")
    return response, lines


def test_max_num_seqs_really_queues(vllm_server: VLLMFactory) -> None:
    server, emulator = vllm_server(max_num_seqs=1, time_per_output_token_s=0.02)
    holder, _lines = _hold_slot(server.url)
    body = {"model": "m", "prompt": "second", "max_tokens": 2}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        second = pool.submit(httpx.post, f"{server.url}/v1/completions", json=body, timeout=_DEADLINE_S * 2)
        wait_until(lambda: emulator.stats.waiting == 1)
        assert (
            _gauge(server.url, "vllm:num_requests_running"),
            _gauge(server.url, "vllm:num_requests_waiting"),
        ) == (1, 1)
        assert _gauge(server.url, "vllm:kv_cache_usage_perc") == 1.0
        assert httpx.get(f"{server.url}/load").json() == {"server_load": 2}
        assert not second.done()  # Still queued behind the running stream.
        holder.close()  # The client goes away: vLLM aborts the request and frees its slot.
        assert second.result(timeout=_DEADLINE_S * 2).status_code == 200
    wait_until(lambda: emulator.stats.running == 0)
    assert (emulator.stats.aborted, emulator.stats.completed) == (1, 1)


def test_full_queue_answers_503(vllm_server: VLLMFactory) -> None:
    server, emulator = vllm_server(max_num_seqs=1, max_num_queued_reqs=0, time_per_output_token_s=0.02)
    holder, _lines = _hold_slot(server.url)
    try:
        rejected = httpx.post(f"{server.url}/v1/completions", json={"model": "m", "prompt": "x"})
        assert rejected.status_code == 503
        assert rejected.json()["error"]["code"] == 503 and emulator.stats.rejected == 1
    finally:
        holder.close()


def test_raising_max_num_seqs_starts_waiters(vllm_server: VLLMFactory) -> None:
    server, emulator = vllm_server(max_num_seqs=1, time_per_output_token_s=0.02)
    holder, _lines = _hold_slot(server.url)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            body = {"model": "m", "prompt": "x", "max_tokens": 1}
            second = pool.submit(httpx.post, f"{server.url}/v1/completions", json=body, timeout=_DEADLINE_S)
            wait_until(lambda: emulator.stats.waiting == 1)
            emulator.reconfigure(max_num_seqs=2)
            assert second.result(timeout=_DEADLINE_S).status_code == 200
            assert emulator.stats.running == 1  # The holder is still streaming.
    finally:
        holder.close()


def test_metrics_use_vllm_names_and_labels(vllm_server: VLLMFactory) -> None:
    server, _ = vllm_server(show_deprecated_metrics=True)
    usage = _client(server.url).completions.create(model="m", prompt="one two three", max_tokens=2).usage
    response = httpx.get(f"{server.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    names = [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
    ]
    for name in names:
        assert all(labels["engine"] == "0" and labels["model_name"] == "m" for labels, _ in samples[name])
    assert usage is not None
    assert samples["vllm:prompt_tokens_total"][0][1] == usage.prompt_tokens
    assert samples["vllm:generation_tokens_total"][0][1] == usage.completion_tokens
    success = {labels["finished_reason"]: value for labels, value in samples["vllm:request_success_total"]}
    assert success == {"stop": 0, "length": 1, "abort": 0}
    assert samples["vllm:e2e_request_latency_seconds_count"][0][1] == 1


def test_two_emulators_keep_separate_metrics(vllm_server: VLLMFactory) -> None:
    first, _ = vllm_server()
    second, _ = vllm_server(show_deprecated_metrics=True)
    httpx.post(f"{first.url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert _samples(httpx.get(f"{second.url}/metrics").text)["vllm:generation_tokens_total"][0][1] == 0


def test_die_after_tokens_cuts_the_stream(vllm_server: VLLMFactory) -> None:
    server, emulator = vllm_server(die_after_tokens=2)
    body = {"model": "m", "prompt": "x", "max_tokens": 10, "stream": True}
    events: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response,
    ):
        events.extend(line for line in response.iter_lines() if line)
    assert len(events) == 2 and "data: [DONE]" not in events
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False})
    wait_until(lambda: emulator.stats.aborted == 2)


def test_kill_resets_connections_and_refuses_new_ones() -> None:
    app = create_vllm_app(served_model_names=("m",), time_per_output_token_s=0.02)
    with serve_in_thread(app) as server:
        _, lines = _hold_slot(server.url)
        server.kill()
        with pytest.raises(httpx.HTTPError):
            for _ in lines:
                pass
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health")


def test_startup_delay_refuses_connections_until_listening() -> None:
    app = create_vllm_app(startup_delay_s=0.3)
    with serve_in_thread(app) as server:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health")
        server.wait_started()
        assert httpx.get(f"{server.url}/health").status_code == 200
