"""`LeanTransport`: the `httpx.AsyncBaseTransport` over the pool (`_pool`) and the wire format
(`_wire`): one request sent, its response head read, its body handed to httpx as a stream."""

from __future__ import annotations

from typing import Final

import httpx

from irmiddleware.http11._pool import Connection, Pool
from irmiddleware.http11._wire import NONE, Body, Head, NoResponse, read_head, request_head

__all__ = ["LeanTransport"]

_NO_BODY_STATUS: Final = frozenset({204, 304})


def _timeouts(request: httpx.Request) -> dict[str, float | None]:
    timeout: dict[str, float | None] = request.extensions.get("timeout", {})
    return timeout


class LeanTransport(httpx.AsyncBaseTransport):
    """A plain-HTTP/1.1 transport with a keep-alive pool bounded by `limits`. Timeouts come
    from each request (`httpx.AsyncClient(timeout=...)` puts them there)."""

    def __init__(self, limits: httpx.Limits | None = None) -> None:
        self._limits = limits or httpx.Limits()
        self._pool: Pool | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"LeanTransport speaks plain http only, not {url.scheme!r}")
        if self._pool is None:
            self._pool = Pool(self._limits)  # created in the running loop, on first use
        pool = self._pool
        origin = ("http", url.host, url.port or 80)
        timeouts = _timeouts(request)
        head = request_head(request)
        stream = request.stream
        # A ByteStream yields its one bytes object: joining it returns that object, uncopied, and
        # works whether or not the request was `read()` (which costs a slow typing isinstance).
        body = b"".join(stream) if isinstance(stream, httpx.ByteStream) else None
        connection = await pool.acquire(origin, timeouts)
        try:
            return await self._round_trip(pool, connection, request, head, body, timeouts)
        except NoResponse:
            if connection.requests == 1 or body is None:
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.") from None
        # A reused keep-alive connection the server had closed (its idle timeout racing our
        # request): nothing was processed, so send once more on a fresh connection.
        connection = await pool.acquire(origin, timeouts, fresh=True)
        try:
            return await self._round_trip(pool, connection, request, head, body, timeouts)
        except NoResponse:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.") from None

    async def _round_trip(
        self,
        pool: Pool,
        connection: Connection,
        request: httpx.Request,
        head: bytes,
        body: bytes | None,
        timeouts: dict[str, float | None],
    ) -> httpx.Response:
        connection.requests += 1
        read_timeout = timeouts.get("read")
        try:
            await _send(connection, request, head, body, timeouts.get("write"))
            first = True
            while True:
                raw, rest = await read_head(connection, read_timeout, first)
                first = False
                parsed = Head(raw)
                if parsed.status >= 200:
                    break
                if parsed.status == 101:
                    raise httpx.RemoteProtocolError("unexpected 101 Switching Protocols")
                connection.unread(rest)  # 1xx interim answer (100 Continue, 103): the real one follows
        except BaseException:
            pool.discard(connection)
            raise
        if request.method == "HEAD" or parsed.status in _NO_BODY_STATUS:
            parsed.framing = NONE
        stream = Body(pool, connection, parsed, rest, read_timeout)
        return httpx.Response(
            parsed.status,
            headers=parsed.headers,
            stream=stream,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": parsed.reason},
        )

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.close()


async def _send(
    connection: Connection, request: httpx.Request, head: bytes, body: bytes | None, timeout: float | None
) -> None:
    if connection.closed:
        return  # lost while idle after all: reading finds the EOF and reports NoResponse
    if body is not None:
        # One write, so one syscall and one TCP segment for the usual small JSON request.
        connection.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            connection.write(body)
    else:
        connection.write(head)
        chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
        assert isinstance(request.stream, httpx.AsyncByteStream)
        async for part in request.stream:
            if part and not connection.closed:
                connection.write(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part)
                await connection.drain(timeout)
        if chunked and not connection.closed:
            connection.write(b"0\r\n\r\n")
    await connection.drain(timeout)
