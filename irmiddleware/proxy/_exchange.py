"""One client request as the proxy sees it (`ClientExchange`), the ASGI types, and the two ways the
router answers by itself: `respond` (a whole answer) and `send_error` (an error in the API's shape).

Both the middleware and an attempt (`_attempt`) write to the client through these, so neither
needs the other to answer.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Final

from irmiddleware.hooks import BackendAdapter, RouteInfo
from irmiddleware.proxy._outcomes import Outcome

__all__ = [
    "DISCONNECT_EXTENSION",
    "JSON_HEADERS",
    "REQUEST_ID_HEADER",
    "ASGIApp",
    "ClientExchange",
    "Message",
    "Receive",
    "Reject",
    "Scope",
    "Send",
    "request_id_of",
    "respond",
    "send_error",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON_HEADERS: Final = ((b"content-type", b"application/json"),)
DISCONNECT_EXTENSION: Final = "irmiddleware.on_disconnect"
"""A scope extension of `irmiddleware serve`'s server: `scope["extensions"][DISCONNECT_EXTENSION]`
is a callable that takes, from within the request's task, a function to call with that task,
once, when the client goes away before its answer is complete (None takes it back); called at once
if the client is already gone. The middleware uses it instead of a task per request waiting in
`receive()`; under any other server it keeps that task (plain ASGI)."""
REQUEST_ID_HEADER: Final = b"x-request-id"

# A client's request id is kept when it is 1 to 128 visible ASCII characters: it goes into log
# lines and a header to the backend, where anything longer or with spaces or control characters
# would be a way to forge or bloat them. Any other value is replaced by a generated id.
_SANE_ID: Final = re.compile(rb"[\x21-\x7e]{1,128}")
# Generated ids: a random prefix per process (so two routers never hand out the same id) and a
# counter (cheap, and ordered in the logs).
_ID_PREFIX: Final = os.urandom(6).hex().encode() + b"-"
_ID_NUMBERS: Final = itertools.count(1)
_NO_ROUTE: Final = RouteInfo("", "")  # a request's route until it is read (immutable: shared)


class Reject(Exception):
    """The router answers the request itself with an error (never retried, nothing leased)."""

    def __init__(self, status: int, message: str, outcome: Outcome, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.outcome, self.param = status, message, outcome, param
        self.retry_after: int | None = None


def request_id_of(scope: Scope) -> bytes:
    """The request's `X-Request-ID`: the client's when it is sane (bounded, visible ASCII), else a
    generated one. The scope's headers are rewritten to carry it (exactly once), so that the
    request forwarded to a backend carries the same id the client gets back."""
    headers = scope["headers"]
    given = b""
    count = 0
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            given, count = value, count + 1
    if count == 1 and _SANE_ID.fullmatch(given):
        return bytes(given)
    fresh = _ID_PREFIX + b"%x" % next(_ID_NUMBERS)
    kept = [header for header in headers if header[0] != REQUEST_ID_HEADER] if count else list(headers)
    kept.append((REQUEST_ID_HEADER, fresh))
    scope["headers"] = kept
    return fresh


class ClientExchange:
    """One client request: what it asked for and how far the answer got."""

    __slots__ = (
        "adapter",
        "backend_url",
        "body",
        "disconnected",
        "done",
        "first_byte_s",
        "id",
        "outcome",
        "receive",
        "request_id",
        "route",
        "scope",
        "send",
        "started",
        "started_s",
        "status",
    )

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, adapter: BackendAdapter, request_id: int
    ) -> None:
        self.scope, self.receive, self.send, self.adapter, self.id = scope, receive, send, adapter, request_id
        self.started_s = time.perf_counter()
        self.request_id = request_id_of(scope)
        """The `X-Request-ID` sent to the backend and returned to the client (`id` is the
        router's own sequence number, which plugins' request events carry)."""
        self.body = b""
        self.route = _NO_ROUTE
        self.started = False  # response headers sent to the client: no retry from now on
        self.disconnected = False
        self.done = False  # the last message is being sent: a disconnect now is the normal end
        self.outcome: Outcome = "internal"
        self.backend_url = "none"
        self.status: int | None = None  # the status sent to the client, once it is
        self.first_byte_s = 0.0  # when the response headers went to the client (perf_counter)

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Sends the response headers (`status`, `headers` and the request id): from now on the
        answer belongs to the client and nothing is retried."""
        self.started, self.status, self.first_byte_s = True, status, time.perf_counter()
        headers.append((REQUEST_ID_HEADER, self.request_id))
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def answer(self, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """The router's own whole answer (an error, a model list), with the request id."""
        self.done = True
        await self.start(status, [*headers, (b"content-length", str(len(body)).encode())])
        await self.send({"type": "http.response.body", "body": body, "more_body": False})


async def respond(
    send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = JSON_HEADERS
) -> None:
    """A whole answer: status, `headers` plus Content-Length, and `body` in one message."""
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(
    exchange: ClientExchange,
    status: int,
    message: str,
    param: str | None = None,
    retry_after_s: int | None = None,
) -> None:
    """The adapter's error body for `status`, with `Retry-After` when given; nothing when it is too
    late for an answer (the client already has headers, or is gone)."""
    if exchange.started or exchange.disconnected:
        return
    headers = list(JSON_HEADERS)
    if retry_after_s is not None:
        headers.append((b"retry-after", str(retry_after_s).encode()))
    await exchange.answer(status, exchange.adapter.error_body(status, message, param), headers)
