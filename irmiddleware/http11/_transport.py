"""`LeanTransport`: the `httpx.AsyncBaseTransport` over the pool (`_pool`) and the wire format
(`_wire`): one request written once, its response head read, its body handed to httpx as a stream."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Final

import httpx

from irmiddleware.http11._pool import Connection, Pool, PoolStats
from irmiddleware.http11._wire import (
    ParsedResponse,
    StreamedResponse,
    head_bytes,
    read_head,
    request_head,
)

__all__ = ["KEEPALIVE_EXPIRY_S", "LeanTransport"]

KEEPALIVE_EXPIRY_S: Final = 4.0
"""Idle seconds after which a pooled connection is closed rather than reused: below uvicorn's
default keep-alive timeout (5 s), which most Python inference servers run with."""


def _timeouts(request: httpx.Request) -> dict[str, float | None]:
    timeout: dict[str, float | None] = request.extensions.get("timeout", {})
    return timeout


class LeanTransport(httpx.AsyncBaseTransport):
    """A plain-HTTP/1.1 transport with a keep-alive pool bounded by `limits`. Timeouts come
    from each request (`httpx.AsyncClient(timeout=...)` puts them there).

    `keepalive_expiry` (seconds; None keeps idle connections forever) replaces
    `limits.keepalive_expiry`: an idle connection older than that is closed instead of reused. It
    must stay below the backends' own idle timeout (uvicorn's default is 5 s, httpx's expiry
    default is the same 5 s), so that the backend never closes a connection just as a request is
    written to it. Each request is written at most once (see `ResetAfterWrite`)."""

    def __init__(
        self, limits: httpx.Limits | None = None, keepalive_expiry: float | None = KEEPALIVE_EXPIRY_S
    ) -> None:
        if keepalive_expiry is not None and not 0 <= keepalive_expiry < math.inf:
            raise ValueError(f"keepalive_expiry must be a finite number >= 0 or None, not {keepalive_expiry}")
        self._limits = limits or httpx.Limits()
        self._expiry = keepalive_expiry
        self._pool: Pool | None = None

    def stats(self) -> PoolStats:
        """The pool's connections now (all zero before the first request)."""
        return PoolStats(0, 0, 0) if self._pool is None else self._pool.stats()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        stream = request.stream
        # A ByteStream yields its one bytes object: joining it returns that object, uncopied, and
        # works whether or not the request was `read()` (which costs a slow typing isinstance).
        body = b"".join(stream) if isinstance(stream, httpx.ByteStream) else None
        streamed = await self._round_trip(request.method, request.url, request_head(request), body, request)
        return _httpx_response(streamed)

    async def send_bytes(
        self,
        method: str,
        url: httpx.URL,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        timeouts: Mapping[str, float | None],
    ) -> httpx.Response:
        """`handle_async_request` without an `httpx.Request` (building one, and its head from it,
        is a measurable share of a proxied request's CPU): `headers` are sent as they are, so
        they must include Host and, for a body, Content-Length; `timeouts` are httpx's
        (`Timeout.as_dict()`)."""
        return _httpx_response(await self.open(method, url, headers, body, timeouts))

    async def open(
        self,
        method: str,
        url: httpx.URL,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        timeouts: Mapping[str, float | None],
    ) -> StreamedResponse:
        """`send_bytes` without the `httpx.Response` around the answer (building one costs ~20 us
        of CPU, a tenth of a proxied request's): the answer's status, raw headers and streamed
        body as they are. Iterate over it, then `aclose` it."""
        return await self._round_trip(method, url, head_bytes(method, url.raw_path, headers), body, timeouts)

    async def _round_trip(
        self,
        method: str,
        url: httpx.URL,
        head: bytes,
        body: bytes | None,
        source: httpx.Request | Mapping[str, float | None],
    ) -> StreamedResponse:
        """Writes the request (`body`, or when None the streamed body of the request `source`)
        and reads the response's head. `source` is the request, or the timeouts themselves."""
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"LeanTransport speaks plain http only, not {url.scheme!r}")
        if self._pool is None:
            self._pool = Pool(self._limits, self._expiry)  # created in the running loop, on first use
        pool = self._pool
        timeouts = _timeouts(source) if isinstance(source, httpx.Request) else source
        # A pooled connection comes out of `acquire` checked alive; from there to the write below
        # nothing awaits, so the check still holds when the request is written.
        connection = await pool.acquire(("http", url.host, url.port or 80), timeouts)
        read_timeout = timeouts.get("read")
        response = ParsedResponse(head_only=method == "HEAD")
        try:
            await _send(connection, source, head, body, timeouts.get("write"))
            payload = await read_head(connection, response, read_timeout)
        except BaseException:
            response.close()
            pool.discard(connection)
            raise
        return StreamedResponse(pool, connection, response, payload, read_timeout)

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.close()


def _httpx_response(streamed: StreamedResponse) -> httpx.Response:
    return httpx.Response(
        streamed.status,
        headers=streamed.headers,
        stream=streamed,
        extensions={"http_version": b"HTTP/1.1", "reason_phrase": streamed.reason},
    )


async def _send(
    connection: Connection,
    request: httpx.Request | Mapping[str, float | None],
    head: bytes,
    body: bytes | None,
    timeout: float | None,
) -> None:
    if connection.closed:
        # A new connection the backend closed as soon as it was accepted: nothing was written.
        raise httpx.ConnectError("The backend closed the connection before the request was written.")
    if body is not None:
        # One write, so one syscall and one TCP segment for the usual small JSON request.
        connection.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            connection.write(body)
    else:
        assert isinstance(request, httpx.Request)  # only a request has a streamed body
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
