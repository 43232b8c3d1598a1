"""Helpers for the HTTP/1.1 transport tests (and the proxy's Upstream tests): scripted asyncio
servers on 127.0.0.1, a client over `LeanTransport`, and a bound on every scenario."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import httpx

from irmiddleware.http11 import KEEPALIVE_EXPIRY_S, LeanTransport

__all__ = ["OK", "Handler", "RawServer", "eof", "keep_alive", "lean_client", "read_request", "run_bounded"]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def run_bounded(coro: Coroutine[Any, Any, None]) -> None:
    # The bound keeps a hung exchange from hanging the suite; it is not a timing assertion.
    asyncio.run(asyncio.wait_for(coro, 20))


def lean_client(
    max_connections: int = 10,
    read: float = 5.0,
    pool: float = 5.0,
    keepalive_expiry: float | None = KEEPALIVE_EXPIRY_S,
    **limits: Any,
) -> httpx.AsyncClient:
    timeout = httpx.Timeout(5.0, read=read, pool=pool)
    transport = LeanTransport(httpx.Limits(max_connections=max_connections, **limits), keepalive_expiry)
    return httpx.AsyncClient(transport=transport, timeout=timeout, trust_env=False)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            body += await reader.readexactly(size + 2)
            if not size:
                return head, body[:-2]
            body = body[:-2]
    length = 0
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


class RawServer:
    """A scripted server: `handler(reader, writer, connection_index)` runs per connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed_by_client = 0  # connections on which the server read EOF
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self.connections)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client += 1
        finally:
            writer.close()


def keep_alive(*answers: bytes) -> Handler:
    """Answers each request on a connection with the next of `answers` (cycling)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        for index in range(1000):
            await read_request(reader)
            writer.write(answers[index % len(answers)])
            await writer.drain()

    return handler


async def eof(reader: asyncio.StreamReader) -> None:
    """Waits until the client closes the connection (reading and discarding anything else), then
    raises ConnectionError, which `RawServer` counts in `closed_by_client`."""
    while await reader.read(65536):
        pass
    raise ConnectionError("the client closed the connection")
