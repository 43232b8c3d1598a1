"""Run an ASGI app on a real uvicorn server in a background thread.

The emulators are meant to be driven over real TCP, exactly like a production backend, so tests and
demos exercise connection handling, streaming and failures the way the router will see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

__all__ = ["RunningServer", "serve_in_thread"]

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0
_START_POLL_S = 0.002  # uvicorn has no "started" event; a server starts in ~10-20 ms
# How often a stopping server looks whether its last connection has closed (uvicorn: 0.1 s).
_STOP_POLL_S = 0.005
# uvicorn's tick: it refreshes its Date header and checks its exit flag this often.
_TICK_S = 0.1


class _ThreadServer(uvicorn.Server):
    """uvicorn's server, stopped in milliseconds rather than ~150 ms.

    uvicorn notices `should_exit` at its next 0.1 s tick, then sleeps a fixed 0.1 s before it waits
    for open connections: a price every test paid per server it stopped (a second or more for a test
    with a fleet). Here `wake()` ends the tick at once, and the shutdown waits exactly as long as the
    in-flight responses need: the same steps as uvicorn's (stop listening, ask every connection to
    close once its response is done, wait for them and for background tasks, then the lifespan
    shutdown), polled every 5 ms.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Ends the current tick so the exit flag is read now; call it on the server's loop."""
        self._wake.set()

    async def main_loop(self) -> None:
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _TICK_S)
            should_exit = await self.on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        state = self.server_state
        while (state.connections or state.tasks) and not self.force_exit:
            await asyncio.sleep(_STOP_POLL_S)
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()


class RunningServer:
    """A uvicorn server running in a daemon thread; see `serve_in_thread`."""

    def __init__(self, app: Any, sock: socket.socket, startup_delay_s: float, lifespan: bool = False) -> None:
        self.host: str = sock.getsockname()[0]
        self.port: int = sock.getsockname()[1]
        self.url: str = f"http://{self.host}:{self.port}"
        self._sock = sock
        self._startup_delay_s = startup_delay_s
        self._cancel_start = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        config = uvicorn.Config(app, log_level="warning", lifespan="on" if lifespan else "off")
        self._server = _ThreadServer(config)
        self._thread = threading.Thread(target=self._run, name=f"irm-serve-{self.port}", daemon=True)

    @property
    def started(self) -> bool:
        """True once uvicorn listens and answers requests."""
        return self._server.started

    def start(self) -> None:
        """Start the thread; the socket stays bound but not listening during the startup delay."""
        self._thread.start()

    def wait_started(self, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Block until the server answers, or raise `RuntimeError` after `timeout_s`."""
        # uvicorn has no "started" callback, so poll its flag; the loop is bounded by the deadline.
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"server on {self.url} exited during startup")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start within {timeout_s} s")
            time.sleep(_START_POLL_S)

    def stop(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        """Shut down gracefully: stop accepting, let in-flight responses finish, join the thread."""
        self._cancel_start.set()
        self._server.should_exit = True
        self._call_on_loop(self._server.wake)
        self._thread.join(timeout_s)
        self._sock.close()

    def kill(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        """Die abruptly, like a crashed backend.

        Every open connection is reset (in-flight requests and streams see a broken connection), the
        listening socket is closed (new connections are refused), and uvicorn skips its graceful wait.
        """
        self._cancel_start.set()
        self._server.force_exit = True
        self._server.should_exit = True
        self._call_on_loop(self._abort_connections)
        self._call_on_loop(self._server.wake)
        self._thread.join(timeout_s)
        self._sock.close()

    def _call_on_loop(self, callback: Callable[[], None]) -> None:
        # A server still in its startup delay has no loop yet: it reads its exit flags when it starts.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop may close between the check and here
                loop.call_soon_threadsafe(callback)

    def _abort_connections(self) -> None:
        # Runs on the server's loop. abort() drops the TCP connection at once, without a response.
        for connection in list(self._server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()
        for listener in getattr(self._server, "servers", []):
            listener.close()
        self._sock.close()

    def _run(self) -> None:
        # Like vLLM while it loads its model: the port is bound but not listening, so connecting
        # is refused until the delay is over (doc/protocols.md §1.1).
        if self._cancel_start.wait(self._startup_delay_s):
            return
        with asyncio.Runner() as runner:
            self._loop = runner.get_loop()
            runner.run(self._server.serve(sockets=[self._sock]))


def _bind(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets whose `proto` says TCP, and
    # an accepted socket inherits the listener's (0 when left to the default). Without it, an
    # answer written as a head then a body waits for the client's delayed ACK: ~40 ms each.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # SO_REUSEADDR lets a fault test restart a "crashed" backend on the same port at once.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _startup_delay_of(app: Any) -> float:
    # Emulators keep their configuration at app.state.emulator.config (a convention, not a type).
    emulator = getattr(getattr(app, "state", None), "emulator", None)
    return float(getattr(getattr(emulator, "config", None), "startup_delay_s", 0.0))


@contextlib.contextmanager
def serve_in_thread(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    startup_delay_s: float | None = None,
    wait: bool | None = None,
    lifespan: bool = False,
) -> Iterator[RunningServer]:
    """Serve `app` with uvicorn in a background thread for the duration of the `with` block.

    Args:
        app: any ASGI application, e.g. one from `create_vllm_app`.
        host: the address to bind; keep the default loopback address in tests.
        port: the port to bind; 0 picks a free ephemeral port (read it back from `.port`).
        startup_delay_s: how long the bound port refuses connections before the server listens.
            `None` takes `app.state.emulator.config.startup_delay_s` when the app is an emulator.
        wait: block until the server answers before entering the block. `None` means "wait unless
            there is a startup delay", so a test can watch connections being refused.
        lifespan: run the app's ASGI lifespan (startup/shutdown), e.g. for a router whose upstream
            client lives there. The emulators need none.

    Yields:
        A `RunningServer` with `.url`, `.port`, `.stop()` and `.kill()`. Leaving the block stops
        the server gracefully (a no-op after `.kill()`).
    """
    delay_s = _startup_delay_of(app) if startup_delay_s is None else startup_delay_s
    if delay_s < 0:
        raise ValueError(f"startup_delay_s must be >= 0, got {delay_s}")
    running = RunningServer(app, _bind(host, port), delay_s, lifespan)
    running.start()
    try:
        if wait if wait is not None else delay_s == 0:
            running.wait_started()
        yield running
    finally:
        running.stop()
