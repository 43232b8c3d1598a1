"""The HTTP/1.1 wire format: the request head this client writes, and the response read with llhttp
(`httptools.HttpResponseParser`, the parser uvicorn and Node.js use): status line, headers, body
framing (Content-Length, chunked, read-until-close, none; RFC 9112) and the streamed body.

llhttp does the parsing, strictly (no bare LF, no obs-fold, no Content-Length beside
Transfer-Encoding, no duplicate Content-Length, sizes checked for overflow). What is left here is
what llhttp leaves to its host: bounds on the head (bytes and header count) and on bytes that carry
no payload, the response to a HEAD request (llhttp cannot be told it has no body), a body that ends
at EOF (httptools has no `finish`), and whether the connection is clean to reuse.
"""

from __future__ import annotations

import typing
from collections.abc import AsyncIterator, Sequence
from typing import Final

import httptools
import httpx

from irmiddleware.http11._pool import Connection, Pool

__all__ = [
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "ParsedResponse",
    "ResetAfterWrite",
    "StreamedResponse",
    "read_head",
    "request_head",
]

MAX_HEAD_BYTES: Final = 64 * 1024
"""Status line and header bytes of one response, and bytes in a row that carry no payload (chunk
framing, trailers): more is a broken or hostile backend."""
MAX_HEADERS: Final = 256
"""Header (or trailer) lines in one response."""
_OWS: Final = (b" ", b"\t")
_HTTP11: Final = b" HTTP/1.1\r\n"
_SEP: Final = b": "
_CRLF: Final = b"\r\n"


def request_head(request: httpx.Request) -> bytes:
    return head_bytes(request.method, request.url.raw_path, request.headers.raw)


def head_bytes(method: str, target: bytes, raw: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A request head: `method target HTTP/1.1`, the headers `raw` as they are, the empty line."""
    parts = [method.encode("ascii"), b" ", target, _HTTP11]
    for name, value in raw:
        parts += (name, _SEP, value, _CRLF)
    parts.append(_CRLF)
    head = b"".join(parts)
    # Request smuggling guard in two C scans: every CR and LF in the head must be one we wrote.
    lines = len(raw) + 2
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise httpx.LocalProtocolError("CR or LF inside the request target or a header")
    return head


class ResetAfterWrite(httpx.RemoteProtocolError):
    """The connection ended (closed or reset by the backend) after the request was written to it
    and before a single byte of the response arrived. The backend may have received the request and
    may be working on it: the transport never sends it again. Whether to try another backend is the
    caller's decision (it is a `RemoteProtocolError`, so code that retried those still does)."""


class _Stop(Exception):
    """Raised in a parser callback to stop llhttp: the response ended where llhttp cannot see it
    (a HEAD answer's head), or a second response began after this one."""


class ParsedResponse:
    """One response as llhttp parses it; httptools calls the `on_*` methods during `feed`.

    `headers`, `status` and `reason` are the final answer's (1xx interim answers are skipped);
    `head_done` once its head is parsed, `complete` once its body ended; `reusable` says whether
    the connection may carry another request afterwards."""

    __slots__ = (
        "body",
        "complete",
        "dirty",
        "error",
        "head_bytes",
        "head_done",
        "head_only",
        "headers",
        "heads",
        "keep_alive",
        "parser",
        "raw",
        "reason",
        "status",
        "stopped",
        "trailers",
        "unframed_bytes",
    )

    def __init__(self, head_only: bool) -> None:
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.head_only = head_only  # the answer to HEAD: no body whatever its headers say
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.status = 0
        self.head_bytes = 0
        self.heads = 0  # heads parsed, interim ones included
        self.raw = b""  # the bytes of an answer to HEAD, to find where its head ends
        self.trailers = 0
        self.unframed_bytes = 0
        self.head_done = self.complete = self.keep_alive = self.dirty = self.stopped = False
        self.body: list[bytes] = []
        # What a callback raised: httptools turns it into an HttpParserCallbackError.
        self.error: httpx.RemoteProtocolError | None = None

    # llhttp callbacks
    def on_message_begin(self) -> None:
        if self.complete:  # bytes after the answer, parsed as the start of another one
            self.dirty = True
            self._stop()

    def on_status(self, reason: bytes) -> None:
        self.reason += reason
        self.head_bytes += len(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:  # a trailer, which a proxy relays nowhere: only counted
            self.trailers += 1
            if self.trailers > MAX_HEADERS:
                self._fail(f"more than {MAX_HEADERS} trailer lines")
            return
        if value[-1:] in _OWS:
            value = value.rstrip(b" \t")  # llhttp keeps trailing whitespace; a field value has none
        headers = self.headers
        headers.append((name, value))
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEAD_BYTES or len(headers) > MAX_HEADERS:
            self._fail(f"response head larger than {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} header lines")

    def on_headers_complete(self) -> None:
        parser = typing.cast(httptools.HttpResponseParser, self.parser)  # it is calling us
        status = parser.get_status_code()
        self.heads += 1
        if self.head_bytes > MAX_HEAD_BYTES:  # a long reason phrase; headers were counted as they came
            self._fail(f"response head larger than {MAX_HEAD_BYTES} bytes")
        if status < 200:
            if status < 100:  # llhttp takes any three digits
                self._fail(f"invalid status code {status:03d}")
            if status == 101:
                self._fail("unexpected 101 Switching Protocols")
            # 1xx interim answer (100 Continue, 103 Early Hints): the real one follows.
            self.headers, self.reason, self.head_bytes = [], b"", 0
            return
        self.status, self.head_done = status, True
        # Asked now: llhttp resets its flags once the message is complete.
        self.keep_alive = parser.should_keep_alive()
        if self.head_only:
            self.complete = True
            self._stop()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = self.head_done  # an interim answer's end is not the response's

    def _fail(self, message: str) -> None:
        self.error = httpx.RemoteProtocolError(message)
        raise self.error

    def _stop(self) -> None:
        self.stopped = True
        raise _Stop

    # used by the exchange
    def feed(self, data: bytes) -> bytes:
        """Parses `data` (not empty); returns the payload bytes it completes, as they are."""
        if self.head_only:
            self.raw += data
        try:
            typing.cast(httptools.HttpResponseParser, self.parser).feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as error:
            self._parse_error(error)
        body = self.body
        if not body:
            # Payload-free bytes in a row (a head, chunk framing, trailers) are bounded: llhttp
            # keeps no buffer, but httptools joins a header's pieces until the line ends.
            self.unframed_bytes += len(data)
            if self.unframed_bytes > MAX_HEAD_BYTES and not self.complete:
                raise httpx.RemoteProtocolError(f"more than {MAX_HEAD_BYTES} bytes without payload")
            return b""
        self.unframed_bytes = 0
        self.body = []
        return body[0] if len(body) == 1 else b"".join(body)

    def _parse_error(self, error: Exception) -> None:
        if self.error is not None:
            failure, self.error = self.error, None  # its traceback holds us: no cycle through it
            raise failure from None
        if self.stopped:
            if self.head_only and not self._ends_with_head():
                self.dirty = True  # a HEAD answer's head must be the last bytes received
            return
        if not self.complete:
            raise httpx.RemoteProtocolError(f"invalid response from the backend: {error}") from None
        self.dirty = True  # garbage after a complete answer: the answer stands, the connection goes

    def _ends_with_head(self) -> bool:
        # A blank line (CRLF CRLF) ends each head, and no head holds one before its end: the last
        # head ends after the `heads`-th one.
        raw, end = self.raw, 0
        for _head in range(self.heads):
            end = raw.find(b"\r\n\r\n", end) + 4
            if end < 4:
                return False
        return end == len(raw)

    def at_eof(self) -> bool:
        """The connection ended: True if that ends the body (a body framed by neither
        Content-Length nor chunked coding runs until the connection closes), else False."""
        if not self.head_done or self.complete:
            return self.complete
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length":
                return False
            if lower == b"transfer-encoding" and value.lower().rpartition(b",")[2].strip() == b"chunked":
                return False
        self.complete = True
        return True

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.dirty

    def close(self) -> None:
        """Drops the parser once the exchange is over. The parser holds this object's callbacks:
        a reference cycle that would otherwise wait for the garbage collector (measured: ~3 us of
        collections per request, and garbage promoted to the older generations)."""
        self.parser = None


async def read_head(connection: Connection, response: ParsedResponse, timeout: float | None) -> bytes:
    """Reads until `response`'s head is parsed; returns the payload bytes that came with it."""
    received = False
    while True:
        data = await connection.receive(timeout)
        if not data:
            if not received:
                reason = "reset" if connection.error is not None else "closed"
                raise ResetAfterWrite(
                    f"The backend {reason} the connection after the request was written,"
                    " without sending a response."
                )
            raise httpx.RemoteProtocolError("Server disconnected in the middle of the response head.")
        received = True
        payload = response.feed(data)
        if response.head_done:
            return payload


class StreamedResponse(httpx.AsyncByteStream):
    """A response: its final `status`, `reason` and raw `headers` (names as the backend sent them),
    and its body streamed as it arrives (iterate over it). The connection goes back to the pool
    the moment the body's last byte is read from it; `aclose` before that closes the connection.

    It is also the `stream` of the `httpx.Response` that `LeanTransport` hands to httpx; a caller
    that needs no `httpx.Response` (the proxy's relay) uses it as it is (`LeanTransport.open`)."""

    __slots__ = ("connection", "headers", "pending", "pool", "reason", "response", "status", "timeout")

    def __init__(
        self,
        pool: Pool,
        connection: Connection,
        response: ParsedResponse,
        payload: bytes,
        timeout: float | None,
    ) -> None:
        self.pool, self.response, self.timeout = pool, response, timeout
        self.status, self.reason, self.headers = response.status, response.reason, response.headers
        self.connection: Connection | None = connection
        self.pending = payload
        if response.complete:
            # Usually the whole body came with the head: then the connection is free already.
            self._finish(response.reusable)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self.pending:
                data, self.pending = self.pending, b""
                return data
            connection, response = self.connection, self.response
            if connection is None:
                raise StopAsyncIteration
            try:
                data = await connection.receive(self.timeout)
                if not data:
                    self._eof(connection)
                    continue
                self.pending = response.feed(data)
            except BaseException:
                self._finish(False)
                raise
            if response.complete:
                self._finish(response.reusable)

    def _eof(self, connection: Connection) -> None:
        if connection.error is not None:
            raise httpx.ReadError(f"Connection to the backend broke: {connection.error!r}")
        if not self.response.at_eof():
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
        self._finish(False)

    def _finish(self, reuse: bool) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            self.response.close()
            if reuse:
                self.pool.release(connection)
            else:
                self.pool.discard(connection)

    async def aclose(self) -> None:
        self._finish(False)  # a no-op after a complete body; closes a partly read one
