"""`irmiddleware serve` shuts down gracefully on SIGTERM. With no grace set, a stream in flight
runs to its end before the process exits. With `--shutdown-grace 1`, a stream that would take
~20 s more is cut once the grace is over: the client sees a broken (not a falsely complete)
response, the router closes the upstream connection so the backend stops generating, and the
process exits. A start that fails (the port is taken) exits with 3 and leaves no native table
unclosed. Every wait is bounded; nothing asserts on wall-clock time."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys

import httpx
import pytest
from proxy_support import Emulators, serve_process

from irmiddleware.testing import wait_until

pytestmark = pytest.mark.slow  # signals real `irmiddleware serve` processes

# After its graceful shutdown uvicorn re-raises the signal it caught, so the process ends "killed by
# SIGTERM" like any well-behaved server; 0 if it was told to stop some other way.
_EXITED = (0, -signal.SIGTERM)


def _serve(
    backend_url: str, *flags: str
) -> contextlib.AbstractContextManager[tuple[subprocess.Popen[str], str]]:
    return serve_process("--backend", backend_url, "--model", "m", "--log-level", "warning", *flags)


def _stream(url: str, tokens: int) -> contextlib.AbstractContextManager[httpx.Response]:
    body = {"model": "m", "prompt": "Hi", "max_tokens": tokens, "ignore_eos": True, "stream": True}
    return httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30)


def test_sigterm_lets_a_stream_in_flight_finish(emulators: Emulators) -> None:
    (backend,) = emulators(1, time_per_output_token_s=0.01)
    with _serve(backend.url) as (process, url), _stream(url, 100) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the stream is under way
        process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert len(rest) == 100  # 99 more tokens (the first came before SIGTERM), then [DONE]
        assert process.wait(20) in _EXITED
    assert backend.emulator.stats.completed == 1 and backend.emulator.stats.aborted == 0


def test_sigterm_with_a_grace_cuts_a_longer_stream_and_frees_the_backend(emulators: Emulators) -> None:
    (backend,) = emulators(1, time_per_output_token_s=0.01)
    with _serve(backend.url, "--shutdown-grace", "1") as (process, url), _stream(url, 2000) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        process.send_signal(signal.SIGTERM)
        with pytest.raises(httpx.RemoteProtocolError):  # cut without the last chunk, not "complete"
            for _line in lines:
                pass
        assert process.wait(20) in _EXITED
    wait_until(lambda: backend.emulator.stats.aborted == 1, "the backend saw the upstream close")
    assert backend.emulator.stats.completed == 0 and backend.emulator.stats.running == 0


def test_a_taken_port_fails_the_start_and_closes_the_router() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # `-X dev` shows ResourceWarnings, such as a native table left to the garbage collector.
        command = [sys.executable, "-X", "dev", "-m", "irmiddleware", "serve"]
        command += ["--backend", "http://127.0.0.1:9", "--model", "m", "--listen", f"127.0.0.1:{port}"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 3, result.stderr
    assert "address already in use" in result.stderr
    assert "ResourceWarning" not in result.stderr, result.stderr
