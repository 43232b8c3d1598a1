"""A router and its admin app served by two uvicorn servers in one thread's event loop, as
`irmiddleware serve` runs them (the admin API's calls use the router's clients, which belong to its
loop), and a bounded load loop that records every answer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import uvicorn

from irmiddleware.proxy import RoutingMiddleware
from irmiddleware.testing import wait_until

T = TypeVar("T")


@dataclass
class Served:
    traffic: str
    admin: str
    loop: asyncio.AbstractEventLoop

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Runs `work` on the router's event loop (as a SIGHUP handler would) and returns its result."""
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout=30)


def _socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def serve_with_admin(middleware: RoutingMiddleware) -> Iterator[Served]:
    """Serves `middleware` (lifespan on) and `middleware.admin_app` on two ports of one loop;
    stops both and closes the middleware at the end."""
    sockets = [_socket(), _socket()]
    servers = [
        uvicorn.Server(uvicorn.Config(middleware, lifespan="on", log_level="warning")),
        uvicorn.Server(uvicorn.Config(middleware.admin_app, lifespan="off", log_level="warning")),
    ]

    loops: list[asyncio.AbstractEventLoop] = []

    async def run() -> None:
        loops.append(asyncio.get_running_loop())
        pairs = zip(servers, sockets, strict=True)
        await asyncio.gather(*(server.serve(sockets=[sock]) for server, sock in pairs))

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    try:
        wait_until(lambda: all(server.started for server in servers), "both servers listen", timeout_s=10)
        traffic, admin = (f"http://127.0.0.1:{sock.getsockname()[1]}" for sock in sockets)
        yield Served(traffic, admin, loops[0])
    finally:
        for server in servers:
            server.should_exit = True
        thread.join(15)
        for sock in sockets:
            sock.close()
        middleware.close()


@dataclass
class LoadLoop:
    """`threads` clients each sending `requests` completions one after the other (bounded in count;
    each request bounded by a timeout); `statuses` collects every answer's status."""

    url: str
    threads: int = 6
    requests: int = 60
    statuses: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def _client(self) -> None:
        body: dict[str, Any] = {"model": "m", "prompt": "Hi", "max_tokens": 5, "ignore_eos": True}
        with httpx.Client(timeout=30) as client:
            for number in range(self.requests):
                body["user"] = f"session-{number % 16}"  # the session key consistent_hash hashes
                try:
                    self.statuses.append(client.post(f"{self.url}/v1/completions", json=body).status_code)
                except httpx.HTTPError as error:
                    self.errors.append(repr(error))

    @contextlib.contextmanager
    def running(self) -> Iterator[LoadLoop]:
        with ThreadPoolExecutor(self.threads) as pool:
            futures = [pool.submit(self._client) for _ in range(self.threads)]
            yield self
            for future in futures:
                future.result(timeout=120)

    @property
    def done(self) -> int:
        return len(self.statuses) + len(self.errors)
