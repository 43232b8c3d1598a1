"""`irmiddleware emulate` serves each protocol as a real process on the port it is given, answers a
real client there, reports bad options clearly, and stops cleanly on SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import httpx
import openai
import pytest

from irmiddleware.testing import wait_until

pytestmark = pytest.mark.slow  # starts emulator processes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def emulate(*args: str) -> Iterator[subprocess.Popen[str]]:
    command = [sys.executable, "-m", "irmiddleware", "emulate", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_vllm_on_a_given_port_serves_the_openai_client_and_stops_on_sigterm() -> None:
    port = free_port()
    with emulate("vllm", "--port", str(port), "--model", "a", "--model", "b", "--seed", "3") as process:
        assert process.stdout is not None
        assert process.stdout.readline().startswith(
            f"emulated vllm serving a, b: api http://127.0.0.1:{port}"
        )
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        assert [model.id for model in client.models.list()] == ["a", "b"]
        completion = client.completions.create(model="b", prompt="Hi", max_tokens=3)
        assert completion.usage is not None and completion.usage.completion_tokens == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0


def test_triton_serves_its_metrics_port_and_tgi_its_one_model() -> None:
    port, metrics_port, tgi_port = free_port(), free_port(), free_port()
    triton_args = ("triton", "--port", str(port), "--metrics-port", str(metrics_port), "--model", "llm")
    with emulate(*triton_args), emulate("tgi", "--port", str(tgi_port), "--model", "org/m"):
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/v2/health/ready"), "triton up", timeout_s=20)
        wait_until(lambda: answers(f"http://127.0.0.1:{tgi_port}/health"), "tgi up", timeout_s=20)
        index = httpx.post(f"http://127.0.0.1:{port}/v2/repository/index").json()
        assert [entry["name"] for entry in index] == ["llm"]
        assert (
            "nv_inference_pending_request_count" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        )
        assert httpx.get(f"http://127.0.0.1:{tgi_port}/info").json()["model_id"] == "org/m"


def test_bad_options_are_refused_with_a_message() -> None:
    with emulate("tgi", "--port", str(free_port()), "--model", "a", "--model", "b") as process:
        assert process.wait(timeout=20) == 2
        assert process.stderr is not None and "TGI serves one model" in process.stderr.read()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with emulate("vllm", "--port", str(taken.getsockname()[1])) as process:
            assert process.wait(timeout=20) == 1
            assert process.stderr is not None and "irmiddleware emulate:" in process.stderr.read()
