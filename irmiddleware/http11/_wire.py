"""The HTTP/1.1 wire format: the request head, the response head, body framing (Content-Length,
chunked, read-until-close, none) and the streamed response body (RFC 9112)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

import httpx

from irmiddleware.http11._pool import Connection, Pool

__all__ = [
    "CHUNKED",
    "LENGTH",
    "NONE",
    "UNTIL_CLOSE",
    "Body",
    "Chunked",
    "Head",
    "NoResponse",
    "read_head",
    "request_head",
]

_MAX_HEAD_BYTES: Final = 64 * 1024  # status line + headers; more is a broken or hostile backend
_MAX_CHUNK_LINE: Final = 4096  # a chunk-size line with extensions, or one trailer line
_HTTP11: Final = b" HTTP/1.1\r\n"
_SEP: Final = b": "
_CRLF: Final = b"\r\n"


def request_head(request: httpx.Request) -> bytes:
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


class NoResponse(Exception):
    """The connection ended before a single byte of the response: the request may be retried."""


# Body framing (RFC 9112 §6.3).
NONE, LENGTH, CHUNKED, UNTIL_CLOSE = range(4)


class Head:
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
        self.framing = CHUNKED if chunked else (UNTIL_CLOSE if encoded or self.length is None else LENGTH)

    def _content_length(self, value: bytes) -> None:
        if not value.isdigit() or (self.length is not None and self.length != int(value)):
            raise httpx.RemoteProtocolError(f"invalid Content-Length {value[:40]!r}")
        self.length = int(value)


async def read_head(connection: Connection, timeout: float | None, first: bool) -> tuple[bytes, bytes]:
    """The raw head (without its blank line) and the bytes after it."""
    data = b""
    while True:
        chunk = await connection.receive(timeout)
        if not chunk:
            if first and not data:
                raise NoResponse
            raise httpx.RemoteProtocolError("Server disconnected in the middle of the response head.")
        start = max(0, len(data) - 3)
        data = data + chunk if data else chunk
        end = data.find(b"\r\n\r\n", start)
        if end >= 0:
            return data[:end], data[end + 4 :]
        if len(data) > _MAX_HEAD_BYTES:
            raise httpx.RemoteProtocolError("response head too large")


class Chunked:
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


class Body(httpx.AsyncByteStream):
    """The response body, streamed as it arrives. The connection goes back to the pool the
    moment the body's last byte is read from it; `aclose` before that closes the connection."""

    __slots__ = ("chunked", "connection", "framing", "keep", "pending", "pool", "remaining", "timeout")

    def __init__(
        self, pool: Pool, connection: Connection, head: Head, rest: bytes, timeout: float | None
    ) -> None:
        self.pool, self.timeout, self.framing, self.keep = pool, timeout, head.framing, not head.close
        self.connection: Connection | None = connection
        self.remaining = head.length or 0
        self.chunked = Chunked() if head.framing == CHUNKED else None
        self.pending = b""
        if self.framing == NONE or (self.framing == LENGTH and not self.remaining):
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

    def _framed(self, connection: Connection, data: bytes) -> bytes:
        """The payload in `data` (b"" = EOF); finishes the body at its end."""
        if not data:
            return self._eof(connection)
        if self.framing == LENGTH:
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

    def _eof(self, connection: Connection) -> bytes:
        if connection.error is not None:
            raise httpx.ReadError(f"Connection to the backend broke: {connection.error!r}")
        if self.framing == UNTIL_CLOSE:
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
