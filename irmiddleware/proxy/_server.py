"""The client edge of `irmiddleware serve`: uvicorn's httptools protocol with the bounds it lacks.

uvicorn reads a request head of any size (httptools joins a header's pieces as they come, so a
header of tens of MB costs a multiple of its size in memory and seconds of CPU), never times out
a half-sent head or body, arms its keep-alive timer only after a first response (a connection
that sends nothing stays open), and its `limit_concurrency` answers 503 only once a whole head
has arrived. `EdgeProtocol` adds, per connection:

- a head budget checked where the bytes arrive, before the parser buffers them: a head (request
  line and headers) longer than `max_head_bytes`, or with more than `max_headers` fields, gets 431;
- a deadline for the head, from its first byte (`client_head_s`), and one for the body, from the
  end of the head (`client_body_s`): 408, or a plain close if an answer has already begun;
- an idle timeout (`client_idle_s`) from the moment a connection is accepted, not only between
  requests;
- a bound on open connections (`max_client_connections`): one more is answered 503 as soon as it
  is accepted, before any of it is parsed, so the bound holds on sockets as well as on requests.

An answer that ends a connection is followed by a lingering close (the write side is shut, what
the client still sends is discarded for at most `_LINGER_S`), so the client reads the answer
instead of a reset. The bounds are deadlines, not inactivity timers: a client dripping a byte a
second is cut just like one that stopped.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Final, Literal

from prometheus_client import Counter
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from irmiddleware.proxy._exchange import DISCONNECT_EXTENSION
from irmiddleware.proxy.config import LimitsConfig, RouterConfig, TimeoutsConfig

__all__ = ["EDGE_REFUSALS", "EdgeProtocol", "EdgeRefusal", "edge_protocol"]

log = logging.getLogger("irmiddleware.proxy")

_LINGER_S: Final = 2.0
_ERROR_TYPES: Final = {
    408: "RequestTimeoutError",
    431: "RequestHeaderFieldsTooLargeError",
    503: "ServiceUnavailableError",
}


EdgeRefusal = Literal[
    "head_too_large",  # 431: a head over `max_head_bytes`
    "too_many_headers",  # 431: more than `max_headers` fields
    "head_timeout",  # 408: the head did not arrive within `client_head_s`
    "body_timeout",  # 408 (or a plain close once an answer has begun): `client_body_s`
    "too_many_connections",  # 503 at accept: `max_client_connections`
]
"""Why the edge ended a connection itself: the `reason` label of `irm_edge_refusals_total`."""

EDGE_REFUSALS: Final[tuple[EdgeRefusal, ...]] = typing.get_args(EdgeRefusal)


def edge_protocol(config: RouterConfig, refusals: Counter | None = None) -> type[EdgeProtocol]:
    """An `EdgeProtocol` class bound to the configuration's `[router.limits]` and
    `[router.timeouts]`, for `uvicorn.run(app, http=...)` (uvicorn builds one protocol object per
    connection from the class it is given). `refusals` counts the connections it ends, by
    `EdgeRefusal` (the router's `RouterMetrics.edge_refusals`)."""
    counted = {reason: refusals.labels(reason) for reason in EDGE_REFUSALS} if refusals is not None else {}
    attributes = {"limits": config.limits, "timeouts": config.timeouts, "refused": counted}
    return type("EdgeProtocol", (EdgeProtocol,), attributes)


def _answer(status: int, message: str) -> bytes:
    """A complete response that ends the connection, with an OpenAI-style error body (the
    protocol cannot know which adapter the request was for: the head is not read yet)."""
    error = {
        "message": message,
        "type": _ERROR_TYPES.get(status, "RouterError"),
        "param": None,
        "code": status,
    }
    body = json.dumps({"error": error}).encode()
    retry_after = "retry-after: 1\r\n" if status == 503 else ""
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{retry_after}connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounded heads, head/body deadlines, an idle timeout from
    the first moment and a connection bound (module docstring). Use `edge_protocol(config)`."""

    limits: ClassVar[LimitsConfig]
    timeouts: ClassVar[TimeoutsConfig]
    refused: ClassVar[dict[EdgeRefusal, Any]] = {}
    """The `irm_edge_refusals_total` child of each reason (none: not counted)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.timeouts.client_idle_s  # type: ignore[assignment]
        self._reading_head = True  # from the end of one request to the end of the next one's head
        self._head_bytes = 0
        self._headers_count = 0
        self._deadline: asyncio.TimerHandle | None = None  # the head's, the body's, or the linger
        self._ended = False  # an answer that ends the connection was sent; the rest is discarded

    # ---- the connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_client_connections:
            self.transport = transport  # never counted in `connections`, never parsed
            self._end(503, "Too many client connections; retry later.", "too_many_connections")
            return
        super().connection_made(transport)
        # uvicorn arms its keep-alive timer only after a response: a connection that never sends
        # a byte would stay open for good.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeouts.client_idle_s, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)
        self._disconnected()

    def data_received(self, data: bytes) -> None:
        if self._ended:
            return
        # The head's bytes go to the parser no faster than its budget allows, so a head over the
        # budget is refused after at most `max_head_bytes` were buffered, whatever the chunk size.
        while data and self._reading_head:
            room = self.limits.max_head_bytes - self._head_bytes
            piece, data = data[:room], data[room:]
            self._head_bytes += len(piece)
            super().data_received(piece)
            if self._ended or self.transport.is_closing():
                return
            if self._reading_head and self._head_bytes >= self.limits.max_head_bytes:
                self._end(
                    431,
                    f"The request head is larger than {self.limits.max_head_bytes} bytes.",
                    "head_too_large",
                )
                return
        if data:
            super().data_received(data)
        if not self._ended and not self.transport.is_closing():
            self._arm_deadline()

    # ---- parser callbacks ----------------------------------------------------------------------

    # After `_end` the parser may still run to the end of the bytes it was given; what it finds
    # there is ignored.

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers_count += 1
        if self._headers_count <= self.limits.max_headers:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._ended:
            return
        self._cancel_deadline()
        self._reading_head = False
        if self._headers_count > self.limits.max_headers:
            self._end(
                431, f"The request has more than {self.limits.max_headers} header fields.", "too_many_headers"
            )
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._ended:
            super().on_body(body)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # Every request's cycle (pipelined ones too) starts here: its writes go through a
        # `_JoinedWrites`, so a response head and what follows it go out in one write, and its
        # scope carries the disconnect callback's registration (`DISCONNECT_EXTENSION`).
        cycle.transport = _JoinedWrites(self.transport, self.loop)
        cycle.irm_watch = watch = _DisconnectWatch(cycle, self.loop)
        extensions = cycle.scope.get("extensions")
        if extensions is None:
            cycle.scope["extensions"] = {DISCONNECT_EXTENSION: watch}
        else:
            extensions[DISCONNECT_EXTENSION] = watch
        super()._start_asgi_task(cycle, app)

    def _disconnected(self) -> None:
        # uvicorn marked the current request's cycle disconnected (or `_end` did): its app hears
        # of it now, through the callback it registered, as well as from `receive()`.
        cycle = self.cycle
        if cycle is not None and cycle.disconnected:
            watch = getattr(cycle, "irm_watch", None)
            if watch is not None:
                watch.fire()

    def on_message_complete(self) -> None:
        if self._ended:
            return
        self._cancel_deadline()
        self._reading_head = True
        self._head_bytes = self._headers_count = 0
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Part of the next head may have come while this answer was under way: its deadline
        # starts now (an answer in progress never counts against the client's next head).
        if not self._ended and not self.transport.is_closing():
            self._arm_deadline()

    # ---- deadlines and the answers that end a connection ---------------------------------------

    def _arm_deadline(self) -> None:
        """After the parser has had the bytes that came: a head or a body left incomplete gets its
        deadline, unless it has one already. A request that comes whole in one read (the common
        case) never arms a timer."""
        if self._deadline is not None:
            return
        if not self._reading_head:
            self._deadline = self.loop.call_later(self.timeouts.client_body_s, self._body_late)
        elif self._head_bytes and (self.cycle is None or self.cycle.response_complete):
            self._deadline = self.loop.call_later(self.timeouts.client_head_s, self._head_late)

    def _head_late(self) -> None:
        self._deadline = None
        if self._reading_head and not self.transport.is_closing():
            message = f"The request head did not arrive within {self.timeouts.client_head_s:g} s."
            self._end(408, message, "head_timeout")

    def _body_late(self) -> None:
        self._deadline = None
        if not self._reading_head and not self.transport.is_closing():
            message = f"The request body did not arrive within {self.timeouts.client_body_s:g} s."
            self._end(408, message, "body_timeout")

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _end(self, status: int, message: str, reason: EdgeRefusal) -> None:
        """Answers `status` (or, with an answer already begun, only closes) and ends the
        connection, counted under `reason`; the request's app, if one runs, sees the client gone."""
        log.debug("client connection ended with %d: %s", status, message)
        counter = self.refused.get(reason)
        if counter is not None:
            counter.inc()
        self._ended = True
        self._cancel_deadline()
        self._unset_keepalive_if_required()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's later sends are dropped
            cycle.message_event.set()  # and a `receive()` it waits in returns http.disconnect
            self._disconnected()
        if cycle is not None and cycle.response_started:
            # An answer has begun (or ended, e.g. a 413 before the body): nothing more may be sent.
            self.transport.close()
            return
        self.transport.write(_answer(status, message))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._deadline = self.loop.call_later(_LINGER_S, self.transport.close)


class _DisconnectWatch:
    """The `DISCONNECT_EXTENSION` of one request's cycle: `watch(callback)`, from the request's
    task, registers the function to call with that task when the client goes away before the
    answer is complete (at once if it is gone already), `watch(None)` takes it back; `fire` calls
    it, once."""

    __slots__ = ("callback", "cycle", "loop", "task")

    def __init__(self, cycle: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.cycle, self.loop = cycle, loop
        self.callback: Callable[[asyncio.Task[Any]], None] | None = None
        self.task: asyncio.Task[Any] | None = None

    def __call__(self, callback: Callable[[asyncio.Task[Any]], None] | None) -> None:
        self.callback = None
        if callback is None:
            return
        # The caller's task: the one running on this connection's loop now (given the loop,
        # asyncio need not look it up, which costs a system call).
        task = asyncio.current_task(self.loop)
        assert task is not None, "register from within the request's task"
        if self.cycle.disconnected:
            callback(task)
            return
        self.callback, self.task = callback, task
        # What a `receive()` waiting for the disconnect would do: read on, so that the client's
        # close is seen.
        self.cycle.flow.resume_reading()

    def fire(self) -> None:
        callback, self.callback = self.callback, None
        if callback is not None and self.task is not None:
            callback(self.task)


class _JoinedWrites:
    """The transport a request's cycle writes its response to: uvicorn writes a response head and
    its body separately (two system calls, two segments on the wire); this holds the head until
    the next write, or, if none comes in this turn of the event loop, until the loop's next turn
    (a stream's head is never held longer than that). Everything else is the transport's."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._held = b""

    def write(self, data: bytes) -> None:
        if self._held:
            data, self._held = self._held + data, b""
        elif data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 1"):
            # A response head (an interim "100 Continue" is never held: the client waits for it).
            # Holding anything else would only delay it by a turn, never reorder it.
            self._held = data
            self._loop.call_soon(self._flush)
            return
        self._transport.write(data)

    def _flush(self) -> None:
        if self._held:
            data, self._held = self._held, b""
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
