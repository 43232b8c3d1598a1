"""`LeanTransport`: the `httpx.AsyncBaseTransport` over the pool (`_pool`) and the wire format
(`_wire`): one request written once, its response head read, its body handed to httpx as a stream."""

from __future__ import annotations

import math
from collections.abc import Coroutine, Mapping, Sequence
from typing import Final

import httpx

from irmiddleware.http11._pool import Connection, Origin, Pool, PoolStats
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


_TARGETS_MAX: Final = 1024  # URLs remembered by `open` (the proxy's: backends x paths)
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})  # Content-Length even when empty, as httpx


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
        self._targets: dict[int, tuple[httpx.URL, Origin, bytes, bytes]] = {}  # `open`'s URLs, by id

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
        """`open`, with an `httpx.Response` around the answer: `handle_async_request` without an
        `httpx.Request` (building one, and its head from it, is a measurable share of a proxied
        request's CPU). `headers` have neither Host nor Content-Length (added as `open` does);
        `timeouts` are httpx's (`Timeout.as_dict()`)."""
        return _httpx_response(await self.open(method, url, headers, body, timeouts))

    def open(
        self,
        method: str,
        url: httpx.URL,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        timeouts: Mapping[str, float | None],
    ) -> Coroutine[None, None, StreamedResponse]:
        """One request without an `httpx.Request` or `httpx.Response` around it (building the
        response costs ~20 us of CPU, a tenth of a proxied request's): the answer's status, raw
        headers and streamed body as they are. Await it; iterate over the answer, then `aclose`
        it. It adds the two headers httpx would: Host, and Content-Length for a body or a method
        that carries one (POST, PUT, PATCH); `headers` must have neither.

        Meant for a caller that sends to a few URLs again and again with the same `httpx.URL`
        objects (the proxy parses each routed URL once): what the transport reads of a URL is
        remembered per object, since httpx computes its parts anew on every access."""
        target = self._targets.get(id(url))
        if target is None or target[0] is not url:
            target = self._target(url)
        headers = [*headers, (b"host", target[3])]
        if body or method in _BODY_METHODS:
            headers.append((b"content-length", b"%d" % len(body)))
        return self._round_trip(
            method, url, head_bytes(method, target[2], headers), body, timeouts, target[1]
        )

    def _target(self, url: httpx.URL) -> tuple[httpx.URL, Origin, bytes, bytes]:
        # Each entry holds its URL, so the id it is filed under cannot be reused while it is kept.
        if len(self._targets) >= _TARGETS_MAX:
            self._targets.clear()
        origin = (url.scheme, url.host, url.port or 80)
        target = self._targets[id(url)] = (url, origin, url.raw_path, url.netloc)
        return target

    async def _round_trip(
        self,
        method: str,
        url: httpx.URL,
        head: bytes,
        body: bytes | None,
        source: httpx.Request | Mapping[str, float | None],
        origin: Origin | None = None,
    ) -> StreamedResponse:
        """Writes the request (`body`, or when None the streamed body of the request `source`)
        and reads the response's head. `source` is the request, or the timeouts themselves;
        `origin` is the URL's, when the caller knows it."""
        if origin is None:
            origin = (url.scheme, url.host, url.port or 80)
        if origin[0] != "http":
            raise httpx.UnsupportedProtocol(f"LeanTransport speaks plain http only, not {origin[0]!r}")
        if self._pool is None:
            self._pool = Pool(self._limits, self._expiry)  # created in the running loop, on first use
        pool = self._pool
        timeouts = _timeouts(source) if isinstance(source, httpx.Request) else source
        # A pooled connection comes out checked alive (`idle_connection`, else `acquire`); from
        # there to the write below nothing awaits, so the check still holds when it is written.
        connection = pool.idle_connection(origin) or await pool.acquire(origin, timeouts)
        read_timeout = timeouts.get("read")
        response = ParsedResponse(head_only=method == "HEAD")
        try:
            if body is not None and len(body) < 65536 and not connection.closed:
                # The usual small request: one write, so one system call and one TCP segment; the
                # wait for the transport's buffer only when it is full.
                connection.write(head + body)
                if connection.write_paused:
                    await connection.drain(timeouts.get("write"))
            else:
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
