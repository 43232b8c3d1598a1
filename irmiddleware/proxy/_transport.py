"""`LeanTransport`: a small HTTP/1.1 `httpx.AsyncBaseTransport` over asyncio protocols.

The proxy talks plain HTTP/1.1 to a handful of configured backends, so the generality of
httpcore (HTTP/2, proxies, anyio, h11's state machine, a cancel scope around every socket call)
is most of its cost: measured here, httpcore spends ~400 us of CPU per proxied request where this
transport spends a few tens. It keeps `httpx.AsyncClient` as the API: the client still builds
requests and responses; only the bytes on the wire are handled here.

What it does: a keep-alive pool per origin (`scheme, host, port`) with a global connection limit,
a keep-alive limit and expiry; request head and body sent in one write; a response parser for
Content-Length, chunked and read-until-close bodies; a streaming body that yields bytes as they
arrive and gives the connection back to the pool only once the body was read to its end (a body
abandoned halfway closes the connection: a dirty connection is never reused). The four httpx
timeouts (connect, read, write, pool) come from the request's `timeout` extension. Errors are the
httpx exceptions httpcore would raise in the same situation, because the middleware's retry logic
keys on them: a connection that fails before any response byte raises `ConnectError`,
`ConnectTimeout` or `RemoteProtocolError`.

Plain `http://` only; the client mounts it for `http://` so `https://` backends keep httpx's own
transport (and its TLS configuration).
"""

from __future__ import annotations

import asyncio
import collections
import time
import typing
from collections.abc import AsyncIterator
from typing import Final

import httpx

__all__ = ["LeanTransport"]

_MAX_HEAD_BYTES: Final = 64 * 1024  # status line + headers; more is a broken or hostile backend
_MAX_CHUNK_LINE: Final = 4096  # a chunk-size line with extensions, or one trailer line
_HIGH_WATER: Final = 256 * 1024  # buffered, unread response bytes before reading is paused
_NO_BODY_STATUS: Final = frozenset({204, 304})
_HTTP11: Final = b" HTTP/1.1\r\n"
_SEP: Final = b": "
_CRLF: Final = b"\r\n"

Origin = tuple[str, str, int]


def _timeouts(request: httpx.Request) -> dict[str, float | None]:
    timeout: dict[str, float | None] = request.extensions.get("timeout", {})
    return timeout


# ---- one connection ------------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One TCP connection: a receive buffer the response reader pulls from, and write flow
    control. It does no parsing; `_Exchange` does."""

    def __init__(self, pool: _Pool, origin: Origin) -> None:
        self.pool, self.origin = pool, origin
        self.transport: asyncio.Transport | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.eof = False
        self.error: BaseException | None = None  # why the connection was lost, if not a clean EOF
        self.closed = False
        self.idle_since = 0.0
        self.requests = 0  # exchanges started on this connection: > 1 means reused
        self.holds_slot = True  # counted in the pool's `total` until closed
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._reading_paused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it: no isinstance.
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > _HIGH_WATER and not self._reading_paused and self.transport is not None:
            # Back pressure: a slow client must not make the proxy buffer a fast backend's answer.
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake(self._waiter)

    def eof_received(self) -> bool:
        self.eof = True
        self._wake(self._waiter)
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = self.closed = True
        self.error = exc
        self._wake(self._waiter)
        self._wake(self._drain)
        self.pool.lost(self)

    def pause_writing(self) -> None:
        self._drain = self.pool.loop.create_future()

    def resume_writing(self) -> None:
        self._wake(self._drain)
        self._drain = None

    @staticmethod
    def _wake(future: asyncio.Future[None] | None) -> None:
        if future is not None and not future.done():
            future.set_result(None)

    # used by the exchange
    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self, timeout: float | None) -> None:
        drain = self._drain
        if drain is None or self.closed:
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(drain)
        except TimeoutError:
            raise httpx.WriteTimeout("Timed out sending the request.") from None

    def take(self) -> bytes:
        """Everything buffered, without copying in the usual single-chunk case."""
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def unread(self, data: bytes) -> None:
        if data:
            self.chunks.appendleft(data)
            self.buffered += len(data)

    async def receive(self, timeout: float | None) -> bytes:
        """The next buffered bytes; b"" at EOF. Waits at most `timeout` for them (ReadTimeout)."""
        if not self.chunks and not self.eof:
            waiter = self._waiter = self.pool.loop.create_future()
            # A timer handle per wait is much cheaper than asyncio.timeout's task cancellation.
            timer = None if timeout is None else self.pool.loop.call_later(timeout, self._wake, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
            if not self.chunks and not self.eof:
                raise httpx.ReadTimeout("Timed out waiting for the backend's response.")
        if self.chunks:
            return self.take()
        return b""

    @property
    def reusable(self) -> bool:
        return not self.eof and not self.chunks and self.transport is not None

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.eof = self.closed = True


# ---- the pool ------------------------------------------------------------------------------------


class _Pool:
    """Keep-alive connections by origin, with httpx's `Limits` semantics: `max_connections` open
    (or opening) in total, at most `max_keepalive_connections` idle, each idle for at most
    `keepalive_expiry` seconds. Idle connections are reused newest first (warmest)."""

    def __init__(self, limits: httpx.Limits) -> None:
        self.loop = asyncio.get_running_loop()
        self.max_connections = limits.max_connections
        self.max_idle = limits.max_keepalive_connections
        self.expiry = limits.keepalive_expiry
        self.idle: dict[Origin, list[_Connection]] = {}
        self.idle_count = 0
        self.total = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.closed = False

    async def acquire(
        self, origin: Origin, timeouts: dict[str, float | None], fresh: bool = False
    ) -> _Connection:
        """An idle connection to `origin` (unless `fresh`), else a new one once the limit allows."""
        while True:
            connection = None if fresh else self._idle_connection(origin)
            if connection is not None:
                return connection
            if self.max_connections is None or self.total < self.max_connections:
                return await self._connect(origin, timeouts.get("connect"))
            if not self._evict_other_idle():
                await self._wait_for_slot(timeouts.get("pool"))

    def _idle_connection(self, origin: Origin) -> _Connection | None:
        idle = self.idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            self.idle_count -= 1
            if connection.reusable and (self.expiry is None or now - connection.idle_since < self.expiry):
                if idle and self.expiry is not None and now - idle[0].idle_since >= self.expiry:
                    self.discard(idle.pop(0))  # one expired connection closed per reuse: amortized
                return connection
            self.discard(connection)
        return None

    def _evict_other_idle(self) -> bool:
        # At the connection limit with idle connections to other origins: close one (httpcore
        # does the same) rather than wait for a busy one.
        for idle in self.idle.values():
            if idle:
                self.idle_count -= 1
                self.discard(idle.pop(0))
                return True
        return False

    async def _wait_for_slot(self, timeout: float | None) -> None:
        waiter = self.loop.create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken just as we gave up: pass the free slot on
            elif waiter in self.waiters:
                self.waiters.remove(waiter)
            if isinstance(error, TimeoutError):
                raise httpx.PoolTimeout("Timed out waiting for a connection from the pool.") from None
            raise

    def _wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        if self.closed:
            raise httpx.ConnectError("The transport is closed.")
        self.total += 1
        connection = _Connection(self, origin)
        try:
            async with asyncio.timeout(timeout):
                await self.loop.create_connection(lambda: connection, origin[1], origin[2])
        except BaseException as error:
            self.discard(connection)
            if isinstance(error, TimeoutError):
                raise httpx.ConnectTimeout(f"Timed out connecting to {origin[1]}:{origin[2]}.") from None
            if isinstance(error, OSError):
                raise httpx.ConnectError(f"Cannot connect to {origin[1]}:{origin[2]}: {error}") from error
            raise
        return connection

    def release(self, connection: _Connection) -> None:
        """Back to the pool after a complete exchange, or closed when it cannot be reused."""
        if (
            self.closed
            or not connection.reusable
            or (self.max_idle is not None and self.idle_count >= self.max_idle)
        ):
            self.discard(connection)
            return
        connection.idle_since = time.monotonic()
        self.idle.setdefault(connection.origin, []).append(connection)
        self.idle_count += 1
        self._wake_one()

    def discard(self, connection: _Connection) -> None:
        connection.close()
        self._free(connection)

    def lost(self, connection: _Connection) -> None:
        """The connection closed, by either side (it may have been idle)."""
        idle = self.idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)
            self.idle_count -= 1
        self._free(connection)

    def _free(self, connection: _Connection) -> None:
        # Exactly once per connection, whichever of close, loss or a failed connect comes first.
        if connection.holds_slot:
            connection.holds_slot = False
            self.total -= 1
            self._wake_one()

    def close(self) -> None:
        self.closed = True
        for idle in list(self.idle.values()):
            for connection in list(idle):
                self.discard(connection)
        self.idle.clear()
        self.idle_count = 0


# ---- the wire format -----------------------------------------------------------------------------


def _request_head(request: httpx.Request) -> bytes:
    raw = request.headers.raw
    parts = [request.method.encode("ascii"), b" ", request.url.raw_path, _HTTP11]
    for name, value in raw:
        parts += (name, _SEP, value, _CRLF)
    parts.append(_CRLF)
    head = b"".join(parts)
    # Request smuggling guard in two C scans: every CR and LF in the head must be one we wrote.
    lines = len(raw) + 2
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise httpx.LocalProtocolError("CR or LF inside the request target or a header")
    return head


class _NoResponse(Exception):
    """The connection ended before a single byte of the response: the request may be retried."""


# Body framing (RFC 9112 §6.3).
_NONE, _LENGTH, _CHUNKED, _UNTIL_CLOSE = range(4)


class _Head:
    """A parsed status line and header block."""

    __slots__ = ("close", "framing", "headers", "length", "reason", "status")

    def __init__(self, head: bytes) -> None:
        if head.count(b"\n") != head.count(b"\r\n"):
            raise httpx.RemoteProtocolError("bare LF in the response head")
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code, _, self.reason = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
            raise httpx.RemoteProtocolError(f"invalid status line {lines[0][:100]!r}")
        self.status = int(code)
        self.headers: list[tuple[bytes, bytes]] = []
        self.length: int | None = None
        self.close = version == b"HTTP/1.0"
        chunked = encoded = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name[-1] in b" \t" or name[0] in b" \t":
                raise httpx.RemoteProtocolError(f"invalid header line {line[:100]!r}")
            value = value.strip(b" \t")
            self.headers.append((name, value))
            lower = name.lower()
            if lower == b"content-length":
                self._content_length(value)
            elif lower == b"transfer-encoding":
                encoded = True
                chunked = value.lower().rpartition(b",")[2].strip() == b"chunked"
            elif lower == b"connection":
                tokens = value.lower()
                self.close = b"close" in tokens or (self.close and b"keep-alive" not in tokens)
        self.framing = _CHUNKED if chunked else (_UNTIL_CLOSE if encoded or self.length is None else _LENGTH)

    def _content_length(self, value: bytes) -> None:
        if not value.isdigit() or (self.length is not None and self.length != int(value)):
            raise httpx.RemoteProtocolError(f"invalid Content-Length {value[:40]!r}")
        self.length = int(value)


async def _read_head(connection: _Connection, timeout: float | None, first: bool) -> tuple[bytes, bytes]:
    """The raw head (without its blank line) and the bytes after it."""
    data = b""
    while True:
        chunk = await connection.receive(timeout)
        if not chunk:
            if first and not data:
                raise _NoResponse
            raise httpx.RemoteProtocolError("Server disconnected in the middle of the response head.")
        start = max(0, len(data) - 3)
        data = data + chunk if data else chunk
        end = data.find(b"\r\n\r\n", start)
        if end >= 0:
            return data[:end], data[end + 4 :]
        if len(data) > _MAX_HEAD_BYTES:
            raise httpx.RemoteProtocolError("response head too large")


class _Chunked:
    """Incremental `Transfer-Encoding: chunked` decoder: `feed` returns the payload bytes that
    `data` completes (partial chunks included, so nothing waits for a chunk's end)."""

    __slots__ = ("done", "extra", "line", "remaining", "state")
    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self) -> None:
        self.state = self._SIZE
        self.remaining = 0
        self.line = b""  # an incomplete size, data-end or trailer line
        self.done = False
        self.extra = b""  # bytes after the last chunk (a misbehaving server's)

    def feed(self, data: bytes) -> bytes:
        if self.line:
            data, self.line = self.line + data, b""
        out: list[bytes] = []
        pos, size = 0, len(data)
        while pos < size and not self.done:
            if self.state == self._DATA:
                take = min(self.remaining, size - pos)
                out.append(data[pos : pos + take])
                pos += take
                self.remaining -= take
                if not self.remaining:
                    self.state = self._DATA_END
                continue
            end = data.find(b"\r\n", pos)
            if end < 0:
                self.line = data[pos:]
                if len(self.line) > _MAX_CHUNK_LINE:
                    raise httpx.RemoteProtocolError("chunk-size or trailer line too long")
                break
            self._line(data[pos:end])
            pos = end + 2
        if self.done:
            self.extra = data[pos:]
        return out[0] if len(out) == 1 else b"".join(out)

    def _line(self, line: bytes) -> None:
        if self.state == self._SIZE:
            digits = line.partition(b";")[0].strip(b" \t")
            # int(x, 16) would also take "0x", "+" and "_": check the digits first.
            if not digits or len(digits) > 15 or digits.strip(b"0123456789abcdefABCDEF"):
                raise httpx.RemoteProtocolError(f"invalid chunk size {line[:40]!r}")
            self.remaining = int(digits, 16)
            self.state = self._DATA if self.remaining else self._TRAILER
        elif self.state == self._DATA_END:
            if line:
                raise httpx.RemoteProtocolError("chunk data longer than its size")
            self.state = self._SIZE
        elif not line:  # the blank line after the trailers (which a proxy relays nowhere)
            self.done = True


class _Body(httpx.AsyncByteStream):
    """The response body, streamed as it arrives. The connection goes back to the pool the
    moment the body's last byte is read from it; `aclose` before that closes the connection."""

    __slots__ = ("chunked", "connection", "framing", "keep", "pending", "pool", "remaining", "timeout")

    def __init__(
        self, pool: _Pool, connection: _Connection, head: _Head, rest: bytes, timeout: float | None
    ) -> None:
        self.pool, self.timeout, self.framing, self.keep = pool, timeout, head.framing, not head.close
        self.connection: _Connection | None = connection
        self.remaining = head.length or 0
        self.chunked = _Chunked() if head.framing == _CHUNKED else None
        self.pending = b""
        if self.framing == _NONE or (self.framing == _LENGTH and not self.remaining):
            connection.unread(rest)  # bytes nobody asked for make the connection dirty
            self._finish(self.keep)
        elif rest:
            # Usually the whole body came with the head: then the connection is free already.
            self.pending = self._framed(connection, rest)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self.pending:
                data, self.pending = self.pending, b""
                return data
            connection = self.connection
            if connection is None:
                raise StopAsyncIteration
            try:
                self.pending = self._framed(connection, await connection.receive(self.timeout))
            except BaseException:
                self._finish(False)
                raise

    def _framed(self, connection: _Connection, data: bytes) -> bytes:
        """The payload in `data` (b"" = EOF); finishes the body at its end."""
        if not data:
            return self._eof(connection)
        if self.framing == _LENGTH:
            if len(data) < self.remaining:
                self.remaining -= len(data)
                return data
            data, extra = data[: self.remaining], data[self.remaining :]
            connection.unread(extra)
            self.remaining = 0
            self._finish(self.keep)
            return data
        if self.chunked is not None:
            payload = self.chunked.feed(data)
            if self.chunked.done:
                connection.unread(self.chunked.extra)
                self._finish(self.keep)
            return payload
        return data

    def _eof(self, connection: _Connection) -> bytes:
        if connection.error is not None:
            raise httpx.ReadError(f"Connection to the backend broke: {connection.error!r}")
        if self.framing == _UNTIL_CLOSE:
            self._finish(False)
            return b""
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    def _finish(self, reuse: bool) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            if reuse:
                self.pool.release(connection)
            else:
                self.pool.discard(connection)

    async def aclose(self) -> None:
        self._finish(False)  # a no-op after a complete body; closes a partly read one


# ---- the transport -------------------------------------------------------------------------------


class LeanTransport(httpx.AsyncBaseTransport):
    """A plain-HTTP/1.1 transport with a keep-alive pool bounded by `limits`. Timeouts come
    from each request (`httpx.AsyncClient(timeout=...)` puts them there)."""

    def __init__(self, limits: httpx.Limits | None = None) -> None:
        self._limits = limits or httpx.Limits()
        self._pool: _Pool | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"LeanTransport speaks plain http only, not {url.scheme!r}")
        if self._pool is None:
            self._pool = _Pool(self._limits)  # created in the running loop, on first use
        pool = self._pool
        origin = ("http", url.host, url.port or 80)
        timeouts = _timeouts(request)
        head = _request_head(request)
        stream = request.stream
        # A ByteStream yields its one bytes object: joining it returns that object, uncopied, and
        # works whether or not the request was `read()` (which costs a slow typing isinstance).
        body = b"".join(stream) if isinstance(stream, httpx.ByteStream) else None
        connection = await pool.acquire(origin, timeouts)
        try:
            return await self._exchange(pool, connection, request, head, body, timeouts)
        except _NoResponse:
            if connection.requests == 1 or body is None:
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.") from None
        # A reused keep-alive connection the server had closed (its idle timeout racing our
        # request): nothing was processed, so send once more on a fresh connection.
        connection = await pool.acquire(origin, timeouts, fresh=True)
        try:
            return await self._exchange(pool, connection, request, head, body, timeouts)
        except _NoResponse:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.") from None

    async def _exchange(
        self,
        pool: _Pool,
        connection: _Connection,
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
                raw, rest = await _read_head(connection, read_timeout, first)
                first = False
                parsed = _Head(raw)
                if parsed.status >= 200:
                    break
                if parsed.status == 101:
                    raise httpx.RemoteProtocolError("unexpected 101 Switching Protocols")
                connection.unread(rest)  # 1xx interim answer (100 Continue, 103): the real one follows
        except BaseException:
            pool.discard(connection)
            raise
        if request.method == "HEAD" or parsed.status in _NO_BODY_STATUS:
            parsed.framing = _NONE
        stream = _Body(pool, connection, parsed, rest, read_timeout)
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
    connection: _Connection, request: httpx.Request, head: bytes, body: bytes | None, timeout: float | None
) -> None:
    if connection.closed:
        return  # lost while idle after all: reading finds the EOF and reports _NoResponse
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
