"""What the emulators count as the server itself sees it, and the test-only endpoints that expose it:
requests in progress (queued or running) and their peak, until the engine notices that a client went
away and stops, also for a non-streaming request (as vLLM's `with_cancellation` does); request ids
received more than once; and `/_emulator/stats`, `/_emulator/config`, `/_emulator/reset-peak` on
all three protocols, over real HTTP."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable

import httpx
import pytest

from irmiddleware.testing import (
    RunningServer,
    VLLMEmulator,
    create_tgi_app,
    create_triton_app,
    serve_in_thread,
    wait_until,
)

VLLMFactory = Callable[..., tuple[RunningServer, VLLMEmulator]]
BODY = {"model": "m", "prompt": "Hi", "max_tokens": 4, "ignore_eos": True}


def test_peak_counts_queued_and_running_requests(vllm_server: VLLMFactory) -> None:
    # Slow tokens (a second per answer) so the three requests surely overlap, even on a loaded
    # machine; once all three are in, the tokens speed up so the test does not wait out that second.
    server, emulator = vllm_server(max_num_seqs=2, time_per_output_token_s=0.25)
    with httpx.Client(timeout=10) as client, concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = [pool.submit(client.post, f"{server.url}/v1/completions", json=BODY) for _ in range(3)]
        wait_until(lambda: emulator.stats.in_progress == 3, "two running, one waiting")
        emulator.reconfigure(time_per_output_token_s=0.001)
        assert [a.result(timeout=10).status_code for a in answers] == [200] * 3
    stats = httpx.get(f"{server.url}/_emulator/stats").json()
    assert (stats["in_progress"], stats["peak_in_progress"], stats["completed"]) == (0, 3, 3)
    assert httpx.post(f"{server.url}/_emulator/reset-peak").json()["peak_in_progress"] == 0


def test_a_non_streaming_request_stops_when_its_client_goes_away(vllm_server: VLLMFactory) -> None:
    server, emulator = vllm_server(max_num_seqs=1, time_per_output_token_s=0.05)
    long = {**BODY, "max_tokens": 400}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=long, timeout=httpx.Timeout(10, read=0.3))
    # The engine stops at once, long before the 20 s the answer would take.
    wait_until(lambda: emulator.stats.in_progress == 0, "the abandoned request stopped", timeout_s=5)
    assert (emulator.stats.aborted, emulator.stats.completed, emulator.stats.running) == (1, 0, 0)


def test_a_request_id_received_twice_is_counted(vllm_server: VLLMFactory) -> None:
    server, emulator = vllm_server()
    for request_id in ("a", "b", "a"):
        headers = {"x-request-id": request_id}
        assert httpx.post(f"{server.url}/v1/completions", json=BODY, headers=headers).status_code == 200
    assert (emulator.stats.received, emulator.stats.repeated_ids) == (3, 1)


def test_config_endpoint_flips_faults_and_refuses_bad_values(vllm_server: VLLMFactory) -> None:
    server, emulator = vllm_server()
    assert httpx.post(f"{server.url}/_emulator/config", json={"fail_status": 429}).status_code == 200
    assert httpx.post(f"{server.url}/v1/completions", json=BODY).status_code == 429
    refused = httpx.post(f"{server.url}/_emulator/config", json={"fail_status": 200})
    assert refused.status_code == 400 and "fail_status" in refused.json()["error"]
    assert httpx.post(f"{server.url}/_emulator/config", json={"no_such_field": 1}).status_code == 400
    assert httpx.post(f"{server.url}/_emulator/config", json=[1]).status_code == 400
    assert emulator.config.fail_status == 429


def test_tgi_and_triton_have_the_same_endpoints() -> None:
    for app in (create_tgi_app(), create_triton_app()):
        with serve_in_thread(app) as server:
            assert httpx.post(f"{server.url}/_emulator/config", json={"unhealthy": True}).status_code == 200
            assert app.state.emulator.config.unhealthy
            assert httpx.get(f"{server.url}/_emulator/stats").json()["peak_in_progress"] == 0
