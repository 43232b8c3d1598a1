"""One client request as the proxy sees it (`ClientExchange`), the ASGI types, and the two ways the
router answers by itself: `respond` (a whole answer) and `send_error` (an error in the API's shape).

Both the middleware and an attempt (`_attempt`) write to the client through these, so neither
needs the other to answer.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Final

from irmiddleware.hooks import BackendAdapter, RouteInfo
from irmiddleware.proxy._outcomes import Outcome

__all__ = [
    "JSON_HEADERS",
    "ASGIApp",
    "ClientExchange",
    "Message",
    "Receive",
    "Reject",
    "Scope",
    "Send",
    "respond",
    "send_error",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON_HEADERS: Final = ((b"content-type", b"application/json"),)


class Reject(Exception):
    """The router answers the request itself with an error (never retried, nothing leased)."""

    def __init__(self, status: int, message: str, outcome: Outcome, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.outcome, self.param = status, message, outcome, param
        self.retry_after: int | None = None


class ClientExchange:
    """One client request: what it asked for and how far the answer got."""

    __slots__ = (
        "adapter",
        "backend_url",
        "body",
        "disconnected",
        "done",
        "id",
        "outcome",
        "receive",
        "route",
        "scope",
        "send",
        "started",
        "started_s",
    )

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, adapter: BackendAdapter, request_id: int
    ) -> None:
        self.scope, self.receive, self.send, self.adapter, self.id = scope, receive, send, adapter, request_id
        self.body = b""
        self.route = RouteInfo("", "")
        self.started = False  # response headers sent to the client: no retry from now on
        self.disconnected = False
        self.done = False  # the last message is being sent: a disconnect now is the normal end
        self.outcome: Outcome = "internal"
        self.backend_url = "none"
        self.started_s = time.perf_counter()


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
    exchange.started = exchange.done = True
    await respond(exchange.send, status, exchange.adapter.error_body(status, message, param), headers)
