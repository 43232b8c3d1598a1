"""Helpers and fixtures for the proxy tests: vLLM emulators and routers as real uvicorn servers on
127.0.0.1. A module of its own (not conftest) so test files can import its helpers by a unique name."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from irmiddleware.proxy import RouterConfig, RoutingMiddleware, create_app, parse_config
from irmiddleware.testing import RunningServer, VLLMEmulator, create_vllm_app, serve_in_thread, wait_until

# Fast timings so the suite runs in seconds; tests slow down what they need.
FAST = {"time_per_request_s": 0.0, "time_per_prompt_token_s": 0.0, "time_per_output_token_s": 0.001}


@dataclass
class Emulator:
    server: RunningServer
    emulator: VLLMEmulator

    @property
    def url(self) -> str:
        return self.server.url


class RouterServer:
    """A router app served by `serve_in_thread` with its lifespan on (the router's upstream
    client lives in the lifespan); `.app` is the app, `.url` where it listens."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._serving = serve_in_thread(app, lifespan=True)
        self.url = ""

    def __enter__(self) -> RouterServer:
        self.url = self._serving.__enter__().url
        return self

    def __exit__(self, *exc: object) -> None:
        self._serving.__exit__(None, None, None)
        if isinstance(self.app, RoutingMiddleware):
            self.app.close()


def config_for(urls: list[str], models: list[str] | None = ("m",), **router: Any) -> RouterConfig:  # type: ignore[assignment]
    backends: list[dict[str, Any]] = []
    for url in urls:
        entry: dict[str, Any] = {"url": url, "type": "vllm", "capacity": 8}
        if models is not None:
            entry["models"] = list(models)
        backends.append(entry)
    return parse_config({"router": router, "backends": backends})


@contextlib.contextmanager
def held_stream(url: str, path: str, body: dict[str, Any]) -> Iterator[None]:
    """POSTs a streaming request and keeps it open, past its first line, until the block ends;
    then hangs up (the server sees the disconnect)."""
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=30) as response:
        lines = response.iter_lines()  # keep the iterator: dropping it closes the stream
        next(lines)
        yield


Emulators = Callable[..., list[Emulator]]
"""The `emulators` fixture: `emulators(n, **config)` starts n vLLM emulators."""
Routers = Callable[..., RouterServer]
"""The `router` fixture: `router(config, **options)` serves a router."""


@pytest.fixture
def emulators() -> Iterator[Emulators]:
    """`emulators(n, **config)` starts n vLLM emulators serving model "m"."""
    with contextlib.ExitStack() as stack:

        def start(count: int = 1, **overrides: Any) -> list[Emulator]:
            started = []
            for _ in range(count):
                app = create_vllm_app(**{"served_model_names": ("m",), **FAST, **overrides})
                started.append(Emulator(stack.enter_context(serve_in_thread(app)), app.state.emulator))
            return started

        yield start


@pytest.fixture
def router() -> Iterator[Routers]:
    """`router(config, **options)` serves `create_app(config, **options)`; `.app` is the middleware."""
    with contextlib.ExitStack() as stack:

        def start(config: RouterConfig | RoutingMiddleware, **options: Any) -> RouterServer:
            app = config if isinstance(config, RoutingMiddleware) else create_app(config, **options)
            return stack.enter_context(RouterServer(app))

        yield start


def in_flight(middleware: RoutingMiddleware) -> list[int]:
    return [s.requests_in_flight for s in middleware.router.stats()]


def wait_idle(middleware: RoutingMiddleware, timeout_s: float = 5.0) -> None:
    """Waits until nothing is in flight (releases after a client hangs up happen on the router's
    loop a moment later); AssertionError, with the counts, when something is still in flight at
    the deadline."""
    deadline = time.monotonic() + timeout_s
    while any(counts := in_flight(middleware)):
        if time.monotonic() >= deadline:
            raise AssertionError(f"still in flight after {timeout_s} s: {counts}")
        time.sleep(0.01)


def backend_status(server: RouterServer, url: str) -> dict[str, Any]:
    """The router's status entry of the backend at `url`."""
    status: dict[str, Any] = httpx.get(f"{server.url}/irm/status").json()
    return next(b for b in status["backends"] if b["url"] == url)


# Health checks, outlier detection and signal scraping at test speed (50 ms).
FAST_FLEET = {
    "health": {"interval_s": 0.05, "timeout_s": 0.5, "healthy_threshold": 2, "unhealthy_threshold": 2},
    "outliers": {"base_ejection_s": 0.3, "max_ejection_s": 2.0, "overload_penalty_s": 0.3},
    "signals": {"interval_s": 0.05, "timeout_s": 0.5, "max_age_s": 1.0},
}


@contextlib.contextmanager
def serve_process(*args: str, stderr: int | None = None) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Runs `irmiddleware serve ARGS --listen 127.0.0.1:<a free port>` as a process; yields it and
    its URL once the router answers, and kills it at the end of the block if it still runs.
    `stderr=subprocess.PIPE` keeps its log lines for `communicate()`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "irmiddleware", "serve", *args, "--listen", f"127.0.0.1:{port}"]
    process = subprocess.Popen(command, stderr=stderr, text=True)
    url = f"http://127.0.0.1:{port}"
    try:

        def answers() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/irm/status", timeout=1).status_code == 200
            return False

        wait_until(answers, "the router answers", timeout_s=30)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
