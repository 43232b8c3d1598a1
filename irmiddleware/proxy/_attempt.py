"""One try of a request on one backend: take the lease, send, relay the answer, release, once.

`Attempt` is given everything it touches in an `AttemptContext` (the upstream client, the fleet,
the health observer, admission's release callback, the metrics, the observers, the retry
configuration), so it can be built and tested without a middleware. Entering an attempt owns its
lease; leaving it releases the lease exactly once, whatever happened inside (normal end, upstream
error, timeout, client disconnect, cancellation, a bug): `Attempt.__aexit__` is the one place.

When the router gives up on an answer the backend may still be producing, the release waits
`abort_grace_s` after the upstream connection is closed (`Releases`): the backend's own count of
requests in progress must not exceed its capacity because the router's books freed a slot first.

Retry rules (doc/proxy.md, "Retries"), decided here and carried out by the middleware:
- a connection that could not be made (refused, connect timeout) never reached the backend: the
  request may go to another backend;
- a failure after the request was written and before any response byte (a reset, a close, any
  transport error but a timeout) may have started work on the backend: the request is never sent
  to that backend again; it may go to another one, because an inference request changes nothing on
  a backend (no state, only compute), so running it elsewhere is safe: the abandoned backend sees
  its connection closed and stops;
- an overload answer (the adapter's `overload_statuses`) goes to another backend when one is up;
- a timeout is never retried (a slow backend would then be loaded twice), and nothing is retried
  once a byte of the answer reached the client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal, Protocol

import httpx
import pluggy

from irmiddleware import _plugins
from irmiddleware._router import Lease
from irmiddleware.hooks import RequestEvent, RouteInfo
from irmiddleware.proxy._exchange import ClientExchange, send_error
from irmiddleware.proxy._fleet import Backend, Fleet
from irmiddleware.proxy._metrics import RouterMetrics
from irmiddleware.proxy._outcomes import AttemptOutcome, Outcome
from irmiddleware.proxy._upstream import (
    Answer,
    Upstream,
    parsed_url,
    request_headers,
    response_headers,
)
from irmiddleware.proxy.config import RetriesConfig
from irmiddleware.proxy.control import SpeedFeed

__all__ = ["Attempt", "AttemptContext", "Notify", "Releases", "RequestObservers", "Step", "outcome_of"]

log = logging.getLogger("irmiddleware.proxy")

Step = Literal["routed", "first_byte", "completed", "failed"]
"""An attempt's steps that observers hear about (`irm_request_<step>`)."""

_OK_OUTCOMES: Final[frozenset[AttemptOutcome]] = frozenset({"ok", "client_disconnected"})
_PEEK_MAX: Final = 64 * 1024  # bytes held at most while looking for a stream's first event
# Transport failures before any response byte that are *not* retried (the module docstring has the
# rules): a timeout (a slow backend would be loaded twice) and the router's own mistakes (another
# backend would refuse the same request the same way). Every other `httpx.TransportError` is.
_NOT_RETRIED: Final = (
    httpx.TimeoutException,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
    httpx.ProxyError,
)
# Failures where the request certainly never reached the backend.
_NOT_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_NEVER_CONNECTED: Final = (httpx.ConnectError, httpx.ConnectTimeout)


class Notify(Protocol):
    """The type of `AttemptContext.notify`: `notify(step, attempt, status, error)`."""

    def __call__(
        self, step: Step, attempt: Attempt, status: int | None = None, error: str | None = None
    ) -> None: ...


class RequestObservers:
    """Tells the plugins' `irm_request_*` observers about an attempt's steps, through pluggy.

    The hook callers are resolved once, here. A step nobody implements maps to None, so a request
    nobody observes costs one dict lookup and one `is not None` test per step: no event is built
    and pluggy is not entered (a pluggy call costs microseconds, the lookup tens of nanoseconds)."""

    def __init__(self, manager: pluggy.PluginManager, strategy_name: str) -> None:
        self._strategy_name = strategy_name
        self._observers = {
            step: _plugins.HookCalls.of(manager, f"irm_request_{step}")
            for step in ("routed", "first_byte", "completed", "failed")
        }

    def __call__(
        self, step: Step, attempt: Attempt, status: int | None = None, error: str | None = None
    ) -> None:
        observers = self._observers[step]
        if observers is not None:
            exchange = attempt.exchange
            event = RequestEvent(
                request_id=exchange.id,
                path=exchange.route.path,
                model=exchange.route.model,
                backend_id=attempt.backend.id,
                backend_url=attempt.backend.url,
                strategy=self._strategy_name,
                attempt=attempt.number,
                status=status,
                elapsed_s=time.perf_counter() - exchange.started_s,
                error=error,
            )
            observers.notify(event=event)


class Releases:
    """Releases leases, now or after the abort grace.

    `later` keeps a lease `grace_s` longer: the attempt closed its upstream connection while the
    backend was still working on the request, and the backend needs a moment to notice. Until
    then the slot stays taken in the router's books, so no new request can push the backend over
    its capacity. `flush` releases every lease still held (shutdown). Runs on the event loop."""

    def __init__(self, grace_s: float, released: Callable[[int], None]) -> None:
        self.grace_s = grace_s
        self._released = released
        self._held: dict[Lease, tuple[asyncio.TimerHandle, bool, float]] = {}

    def now(self, lease: Lease, ok: bool, latency_s: float | None = None) -> None:
        lease.release(ok=ok, latency_s=latency_s)
        self._released(lease.accelerator_id)  # admission hands the slot to a waiter

    def later(self, lease: Lease, ok: bool, latency_s: float) -> None:
        if self.grace_s <= 0:
            self.now(lease, ok, latency_s)
            return
        handle = asyncio.get_running_loop().call_later(self.grace_s, self._end, lease)
        self._held[lease] = (handle, ok, latency_s)

    def _end(self, lease: Lease) -> None:
        handle, ok, latency_s = self._held.pop(lease)
        handle.cancel()  # a no-op when it is the timer that called
        self.now(lease, ok, latency_s)

    def flush(self) -> None:
        for lease in list(self._held):
            self._end(lease)


@dataclass(frozen=True, slots=True)
class AttemptContext:
    """What an attempt uses besides its request and lease; built once per router."""

    upstream: Upstream
    fleet: Fleet
    """Backends by id, and whether another could take a request (`has_other`)."""
    observe: Callable[[Backend, AttemptOutcome, int | None], None]
    """The health monitor's passive observation of every attempt (outlier detection)."""
    metrics: RouterMetrics
    notify: Notify
    retries: RetriesConfig
    releases: Releases
    """Where leases go back (through admission's release callback, so the freed capacity of a
    backend goes to a waiter), at once or after the abort grace."""
    can_retry: Callable[[RouteInfo, frozenset[int]], bool] | None = None
    """Whether a retry excluding these backends could be served (admission's `can_retry`, which
    knows whether it may wait); None: only when another backend has room now (`has_other`)."""
    speed: SpeedFeed | None = None
    """Learned speed (`[router.speed]`, least_ttft): told each answer's time to first byte and its
    streamed events' pace; None: nothing is measured."""


class Attempt:
    """One try on one backend. Entering it owns `lease`; leaving it releases the lease, exactly
    once, whatever happened inside. `run` returns True when the request may be retried elsewhere."""

    __slots__ = (
        "answered",
        "backend",
        "context",
        "exchange",
        "lease",
        "number",
        "outcome",
        "sent_s",
        "status",
        "tried",
        "unsent",
    )

    def __init__(
        self, context: AttemptContext, exchange: ClientExchange, lease: Lease, number: int, tried: list[int]
    ) -> None:
        self.context, self.exchange, self.lease, self.number = context, exchange, lease, number
        self.tried = tried
        self.backend: Backend = context.fleet.backends[lease.accelerator_id]
        self.outcome: AttemptOutcome = "internal"
        self.status: int | None = None
        self.sent_s = 0.0
        self.unsent = False  # the request certainly never reached the backend (connect failure)
        self.answered = False  # the backend's whole answer was read: it is done with the request

    async def __aenter__(self) -> Attempt:
        self.exchange.backend_url = self.backend.url
        self.context.notify("routed", self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        context = self.context
        if exc_type is not None and self.outcome in ("internal", "ok", "backend_error"):
            self.outcome = "client_disconnected" if self.exchange.disconnected else outcome_of(exc)
        ok = self.outcome in _OK_OUTCOMES or (self.outcome == "backend_error" and (self.status or 500) < 500)
        context.observe(self.backend, self.outcome, self.status)
        # After `observe`, so a backend it just ejected is not handed to a waiter.
        releases = context.releases
        if self.answered or self.unsent or not self.sent_s:
            releases.now(self.lease, ok)
        else:
            # The backend may still be working on it: the connection is closed by now (`run`
            # closes the response, the transport a half-sent request), the grace starts here.
            releases.later(self.lease, ok, time.perf_counter() - self.sent_s)
        # An overload answer retried elsewhere is not how the request ends: the next attempt, or
        # the 503 when none could take it, overwrites this.
        self.exchange.outcome = "no_capacity" if self.outcome == "overloaded" else self.outcome
        if self.sent_s:
            ended_s = time.perf_counter()
            context.metrics.of(self.backend.url).latency.observe(ended_s - self.sent_s)
            if context.speed is not None:
                context.speed.done(self.backend.id, self, ended_s, self.answered and self.outcome == "ok")
        if self.outcome in ("ok", "backend_error"):
            context.notify("completed", self, self.status)
        else:
            context.notify("failed", self, self.status, self.outcome)

    async def run(self) -> bool:
        exchange, adapter = self.exchange, self.backend.adapter
        scope = exchange.scope
        url = self.backend.url + scope["path"]
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        headers = request_headers(scope["headers"])
        self.sent_s = time.perf_counter()
        if self.context.speed is not None:  # perf_counter is CLOCK_MONOTONIC on Linux, the core's
            self.context.speed.sent(self.backend.id, self, self.sent_s)
        try:
            response = await self.context.upstream.open(
                scope["method"], parsed_url(url), headers, exchange.body
            )
        except httpx.HTTPError as error:
            return await self._failed_before_answer(error)
        try:
            if response.status in adapter.overload_statuses and self._retry_overloaded(response.status):
                return True
            chunks = aiter(response)
            held = b""
            if adapter.overload_in_stream and _is_event_stream(response):
                try:
                    held = await _first_event(chunks)
                except httpx.HTTPError as error:
                    return await self._failed_before_answer(error, "before its first event")
                # The status TGI gives the same overload outside a stream (doc/protocols.md §3.4).
                if adapter.stream_overloaded(held) and self._retry_overloaded(429):
                    return True
            await self._relay(response, chunks, held)
        finally:
            await response.aclose()
        return False

    async def _failed_before_answer(self, error: httpx.HTTPError, when: str = "") -> bool:
        # Nothing reached the client yet. A retriable failure (the module docstring's rules) goes
        # to another backend (True); any other is answered 502/504 here (False).
        self.unsent = isinstance(error, _NOT_SENT)
        if isinstance(error, httpx.TransportError) and not isinstance(error, _NOT_RETRIED):
            # Only a connection that was never made is a connect error. A RemoteProtocolError is a
            # close or reset after the write (`http11.ResetAfterWrite`, or httpx's own "Server
            # disconnected without sending a response"): the backend may be working on it.
            if isinstance(error, _NEVER_CONNECTED) and not when:
                self.outcome, what = "connect_error", "could not be reached"
            else:
                self.outcome, what = "upstream_error", "failed after the request was written"
            log.warning(
                "backend %s %s%s (request %s, attempt %d): %r",
                self.backend.url,
                what,
                when and f", {when}",
                self.exchange.request_id.decode(),
                self.number,
                error,
            )
            return True
        self.outcome = outcome_of(error)
        await send_error(self.exchange, *_upstream_failure(self.outcome))
        return False

    def _retry_overloaded(self, status: int) -> bool:
        # An overload answer is retried on another backend while retries remain and one could take
        # it (now, or by waiting in admission until the request's deadline); otherwise the
        # backend's own answer is relayed, as the honest reply.
        if self.number > self.context.retries.connect_attempts:
            return False
        excluded = frozenset((*self.tried, self.backend.id))
        can_retry = self.context.can_retry
        if can_retry is not None:
            if not can_retry(self.exchange.route, excluded):
                return False
        elif not self.context.fleet.has_other(self.exchange.route, excluded):
            return False
        self.outcome, self.status = "overloaded", status
        log.info("backend %s overloaded (%d); trying another", self.backend.url, status)
        return True

    async def _relay(self, response: Answer, chunks: AsyncIterator[bytes], held: bytes) -> None:
        exchange = self.exchange
        self.status = response.status
        now = time.perf_counter()
        metrics = self.context.metrics.of(self.backend.url)
        metrics.ttfb.observe(now - self.sent_s)
        metrics.first_byte.observe(now - exchange.started_s)
        self.context.notify("first_byte", self, self.status)
        send = exchange.send
        headers = response_headers(response.headers)
        # A body of known length ends with the chunk that completes it: that chunk is the last
        # message (one send, and the server writes the head and the whole body at once).
        remaining = _content_length(headers)
        await exchange.start(self.status, headers)
        # Learned speed (when on) needs the first *body* byte (a streaming server sends its headers
        # before the prefill) and the stream's events, counted per chunk with no clock read: the
        # pace is taken once, at the end (one event ~ one token of an OpenAI-style stream).
        speed = self.context.speed if self.status < 400 else None
        first_s = now if held else 0.0
        if speed is not None and held:
            speed.answering(self.backend.id, self, first_s)
        events = held.count(b"\n\n") if speed is not None else 0
        try:
            if held:
                await send({"type": "http.response.body", "body": held, "more_body": True})
            async for chunk in chunks:
                if self.answered:
                    continue  # nothing follows a whole body: on to the iterator's end (and the pool)
                if speed is not None:  # off by default: then no per-chunk work for it
                    if not first_s:
                        first_s = time.perf_counter()
                        speed.answering(self.backend.id, self, first_s)
                    events += chunk.count(b"\n\n")
                if remaining is not None:
                    remaining -= len(chunk)
                    if remaining <= 0:
                        self._ended()
                        await send({"type": "http.response.body", "body": chunk, "more_body": False})
                        continue
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as error:
            # Headers are out: the only honest signal left is a broken connection, so end without
            # completing the response (the server then closes it) instead of faking a clean end.
            self.outcome = outcome_of(error)
            log.warning("backend %s broke off a response: %r", self.backend.url, error)
            return
        if speed is not None and first_s:
            self._observe_speed(speed, first_s, events)
        if not self.answered:
            self._ended()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        self.outcome = "ok" if self.status < 400 else "backend_error"

    def _ended(self) -> None:
        # Before the last message: a disconnect from now on is the normal end of the exchange.
        self.answered = True
        self.exchange.done = True

    def _observe_speed(self, speed: SpeedFeed, first_s: float, events: int) -> None:
        prompt = self.exchange.route.prompt
        prompt_chars = len(prompt) if prompt else len(self.exchange.body)
        speed.first_byte(
            self.backend.id, prompt_chars, self.lease.matched_blocks, first_s - self.sent_s, first_s
        )
        if events > 1:
            end_s = time.perf_counter()
            speed.streamed(self.backend.id, events - 1, end_s - first_s, end_s)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The body's length from the relayed headers; None when unknown (a stream), or when the
    status has no body, or the length is 0 (the empty last message ends those)."""
    for name, value in headers:
        if name == b"content-length" or (len(name) == 14 and name.lower() == b"content-length"):
            return int(value) if value.isdigit() and int(value) > 0 else None
    return None


def _is_event_stream(response: Answer) -> bool:
    if response.status != 200:
        return False
    for name, value in response.headers:
        if len(name) == 12 and name.lower() == b"content-type":
            return value.startswith(b"text/event-stream")
    return False


async def _first_event(chunks: AsyncIterator[bytes]) -> bytes:
    """The stream's bytes up to the end of its first event (or all of it, if shorter, or the first
    `_PEEK_MAX` bytes). `chunks` stays open: relaying continues from where this stopped."""
    held = b""
    async for chunk in chunks:
        held += chunk
        if b"\n\n" in held or b"\r\n\r\n" in held or len(held) > _PEEK_MAX:
            break
    return held


def outcome_of(error: BaseException | None) -> Outcome:
    """The outcome of an attempt ended by `error`."""
    if isinstance(error, httpx.TimeoutException):
        return "timeout"
    if isinstance(error, httpx.HTTPError):
        return "upstream_error"
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    return "internal"


def _upstream_failure(outcome: Outcome) -> tuple[int, str]:
    if outcome == "timeout":
        return 504, "The backend did not answer in time."
    return 502, "The backend failed to answer."
