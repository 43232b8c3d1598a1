"""`RoutingMiddleware`: a pure-ASGI proxy in front of a fleet of inference servers.

Requests on the adapters' paths are routed to a backend serving the requested model and relayed
back unbuffered; everything else goes to the wrapped app. The load taken for a request is released
in exactly one place, `_Attempt.__aexit__`, which wraps both the upstream call and the streaming of
its body: whatever ends the attempt (normal end, upstream error, timeout, client disconnect,
cancellation, a bug) passes through it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Any, Final

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from irmiddleware import _plugins
from irmiddleware._router import Lease
from irmiddleware.hooks import AdapterError, BackendAdapter, Endpoint, RequestEvent, RouteInfo
from irmiddleware.proxy._admission import Admission, Shed
from irmiddleware.proxy.config import RouterConfig
from irmiddleware.proxy._fleet import Backend, Fleet
from irmiddleware.proxy._health import FleetMonitor
from irmiddleware.proxy._metrics import RouterMetrics
from irmiddleware.proxy._outcomes import AttemptOutcome, Outcome
from irmiddleware.proxy._upstream import (
    CONNECT_ERRORS,
    Upstream,
    parsed_url,
    request_headers,
    response_headers,
)

__all__ = ["ASGIApp", "RoutingMiddleware", "create_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("irmiddleware.proxy")

_JSON: Final = [(b"content-type", b"application/json")]
_OK_OUTCOMES: Final[frozenset[AttemptOutcome]] = frozenset({"ok", "client_disconnected"})
_PEEK_MAX: Final = 64 * 1024  # bytes held at most while looking for a stream's first event
# Failures before any response byte: the request never started on the backend's side as far as the
# client can tell, so it may go to another backend. A read error here is a backend that died (or
# reset the connection) after taking the request; a read *timeout* is not retried (a slow backend
# would then be loaded twice).
_RETRIABLE: Final = (*CONNECT_ERRORS, httpx.ReadError, httpx.WriteError)


class _Reject(Exception):
    """The router answers the request itself with an error (never retried, nothing leased)."""

    def __init__(self, status: int, message: str, outcome: Outcome, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.outcome, self.param = status, message, outcome, param
        self.retry_after: int | None = None


class _Exchange:
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


class RoutingMiddleware:
    """Routes inference requests to a fleet; passes every other request to `app`.

    `RoutingMiddleware(app, config)` builds the router and loads the plugins once. The upstream
    client is created at lifespan startup (or on the first request when the server runs without
    lifespan) and closed at shutdown. `plugins` are registered in addition to the `irmiddleware`
    entry points (handy in tests); `entry_points=False` loads only those.
    """

    def __init__(
        self,
        app: ASGIApp,
        config: RouterConfig,
        *,
        plugins: tuple[object, ...] = (),
        entry_points: bool = True,
    ) -> None:
        self.app = app
        self.config = config
        self.plugin_manager, broken = _plugins.load_plugins(*plugins, entry_points=entry_points)
        self.registry = _plugins.collect(self.plugin_manager, broken)
        self.metrics = RouterMetrics(self._backend_stats)
        self.fleet = Fleet(config, self.registry, self.metrics)
        self.admission = Admission(config.admission, self.fleet, self.metrics.registry, config.retry_after_s)
        self._routes = _routes_of(self.fleet.backends.values())
        self._matchers = _matchers_of(self.fleet.backends.values())
        self.monitor = FleetMonitor(self.fleet, config, self.plugin_manager, self.metrics.registry)
        self._observers = {
            name: _plugins.observers(self.plugin_manager, f"irm_request_{name}")
            for name in ("routed", "first_byte", "completed", "failed")
        }
        self._upstream: Upstream | None = None
        self._start_lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._created = int(time.time())
        self._session_header = config.affinity.session_header.lower().encode("latin-1")

    @property
    def router(self) -> Any:
        """The native `Router` (stats, states, pools)."""
        return self.fleet.router

    # ---- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, self._lifespan_receive(receive), send)
                return
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        found = self._routes.get(path)
        if found is None and self._matchers:
            found = _match(self._matchers, scope["method"], path)
        if found is not None and scope["method"] in found[0].methods:
            await self._handle(scope, receive, send, *found)
        elif path == self.config.metrics_path and scope["method"] == "GET":
            await _respond(
                send,
                200,
                generate_latest(self.metrics.registry),
                [(b"content-type", CONTENT_TYPE_LATEST.encode())],
            )
        elif path == self.config.status_path and scope["method"] == "GET":
            await _respond(send, 200, json.dumps(self.status()).encode(), _JSON)
        else:
            await self.app(scope, receive, send)

    def _lifespan_receive(self, receive: Receive) -> Receive:
        async def receive_and_manage() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
            return message

        return receive_and_manage

    async def startup(self) -> None:
        """Creates the upstream client and discovers models; idempotent."""
        async with self._start_lock:
            if self._upstream is None:
                upstream = Upstream(self.config)
                await self.fleet.discover(upstream.client)
                await self.monitor.start()
                self._upstream = upstream

    async def aclose(self) -> None:
        """Stops health checks and scrapers and closes the upstream client (lifespan shutdown)."""
        await self.monitor.stop()
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            await upstream.aclose()

    # ---- one request ---------------------------------------------------------------------------

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, endpoint: Endpoint, adapter: BackendAdapter
    ) -> None:
        if self._upstream is None:
            await self.startup()
        exchange = _Exchange(scope, receive, send, adapter, next(self._ids))
        try:
            if endpoint.kind == "models":
                body = adapter.models_body(self.fleet.models, self._created)
                await _respond(send, 200, body, _JSON)
                exchange.outcome = "ok"
                return
            if endpoint.kind == "health":
                status, body = adapter.health_answer(any(s.state == "active" for s in self.router.stats()))
                await _respond(send, status, body, _JSON if body else [])
                exchange.outcome = "ok"
                return
            await self._read_request(exchange, endpoint)
            exchange.route, exchange.body, ticket = self.admission.admit(
                scope["headers"], adapter, exchange.route, exchange.body
            )
            with ticket:  # the tenant's concurrency slot, held until the answer ends
                await self._route_watching_disconnect(exchange)
        except (_Reject, Shed) as reject:
            exchange.outcome = reject.outcome
            await self._send_error(exchange, reject.status, reject.message, reject.param, reject.retry_after)
        except Exception:
            log.exception("internal error while routing %s", scope["path"])
            exchange.outcome = "internal"
            await self._send_error(exchange, 500, "Internal router error.")
        finally:
            self.metrics.count(exchange.backend_url, exchange.outcome)

    async def _read_request(self, exchange: _Exchange, endpoint: Endpoint) -> None:
        exchange.body = await _read_body(exchange, self.config.limits.max_body_bytes)
        try:
            model = exchange.adapter.model_of(endpoint, exchange.scope["path"], exchange.body)
        except AdapterError as error:
            raise _Reject(error.status, error.message, "rejected", error.param) from None
        if not self.fleet.serves(model):
            model = self.fleet.default_model(exchange.adapter) or model
        if not self.fleet.serves(model):
            raise _Reject(404, f"The model `{model}` does not exist.", "rejected", "model")
        session_key = prompt = None
        if self.fleet.wants_session_key or self.fleet.wants_prompt:
            session_key, prompt = exchange.adapter.affinity_of(endpoint, exchange.body)
            header = _header(exchange.scope, self._session_header)
            session_key = header or session_key
        exchange.route = RouteInfo(exchange.scope["path"], model, session_key=session_key, prompt=prompt)

    async def _route_watching_disconnect(self, exchange: _Exchange) -> None:
        # The request body is read, so the next `receive()` returns only when the client goes
        # away (or after the response is complete). A watcher cancels the relay at once, which
        # closes the upstream connection and lets the backend stop generating.
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.create_task(_watch_disconnect(exchange, task))
        try:
            await self._route(exchange)
        except asyncio.CancelledError:
            if not exchange.disconnected:
                exchange.outcome = "cancelled"
                raise
            task.uncancel()
            exchange.outcome = "client_disconnected"
        finally:
            exchange.done = True
            watcher.cancel()

    async def _route(self, exchange: _Exchange) -> None:
        tried: list[int] = []
        overloaded = False
        for _attempt in range(1 + self.config.retries.connect_attempts):
            # The first attempt goes through admission (it may wait, or raise Shed); retries
            # never wait: the request already waited its turn.
            if tried:
                lease = self.fleet.acquire(exchange.route, tried)
            else:
                lease = await self.admission.acquire(exchange.route)
            if lease is None:
                break
            async with _Attempt(self, exchange, lease, len(tried) + 1, tried) as attempt:
                if not await attempt.run():
                    return
            tried.append(lease.accelerator_id)
            overloaded = attempt.outcome == "overloaded"
        if not tried or overloaded:
            raise _Reject(
                503, f"No backend serving `{exchange.route.model}` has capacity; retry later.", "no_capacity"
            )
        raise _Reject(502, f"No backend serving `{exchange.route.model}` could be reached.", "connect_error")

    async def _send_error(
        self,
        exchange: _Exchange,
        status: int,
        message: str,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        if exchange.started or exchange.disconnected:
            return  # Too late for an error answer: the client already has headers, or is gone.
        headers = list(_JSON)
        if status in (429, 503):
            seconds = self.config.retry_after_s if retry_after is None else retry_after
            headers.append((b"retry-after", str(seconds).encode()))
        exchange.started = exchange.done = True
        await _respond(exchange.send, status, exchange.adapter.error_body(status, message, param), headers)

    # ---- observation ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The JSON status document: strategy, models and every backend's state and load."""
        backends = []
        for url, stats in self._backend_stats():
            backend = self.fleet.backends[stats.id]
            backends.append(
                {
                    "id": stats.id,
                    "url": url,
                    "type": backend.type,
                    "models": list(backend.models),
                    "state": stats.state,
                    "capacity": stats.capacity,
                    "weight": stats.weight,
                    "load": stats.load,
                    "requests_in_flight": stats.requests_in_flight,
                    "routed": stats.routed,
                    "completed": stats.completed,
                    "failed": stats.failed,
                    "latency_ewma_s": stats.latency_ewma_s,
                    **self.monitor.status_of(stats.id),
                }
            )
        return {
            "strategy": self.fleet.strategy_name,
            "models": self.fleet.models,
            "backends": backends,
            "admission": self.admission.status(),
        }

    def _backend_stats(self) -> list[tuple[str, Any]]:
        known = self.fleet.backends
        return [(known[s.id].url, s) for s in self.fleet.router.stats() if s.id in known]

    def _notify(
        self, name: str, attempt: _Attempt, status: int | None = None, error: str | None = None
    ) -> None:
        observers = self._observers[name]
        if observers:
            exchange = attempt.exchange
            event = RequestEvent(
                request_id=exchange.id,
                path=exchange.route.path,
                model=exchange.route.model,
                backend_id=attempt.backend.id,
                backend_url=attempt.backend.url,
                strategy=self.fleet.strategy_name,
                attempt=attempt.number,
                status=status,
                elapsed_s=time.perf_counter() - exchange.started_s,
                error=error,
            )
            _plugins.notify(observers, event)


class _Attempt:
    """One try on one backend. Entering it owns `lease`; leaving it releases the lease, exactly
    once, whatever happened inside. `run` returns True when the request may be retried elsewhere."""

    __slots__ = (
        "backend",
        "exchange",
        "lease",
        "middleware",
        "number",
        "outcome",
        "sent_s",
        "status",
        "tried",
    )

    def __init__(
        self, middleware: RoutingMiddleware, exchange: _Exchange, lease: Lease, number: int, tried: list[int]
    ) -> None:
        self.middleware, self.exchange, self.lease, self.number = middleware, exchange, lease, number
        self.tried = tried
        self.backend: Backend = middleware.fleet.backends[lease.accelerator_id]
        self.outcome: AttemptOutcome = "internal"
        self.status: int | None = None
        self.sent_s = 0.0

    async def __aenter__(self) -> _Attempt:
        self.exchange.backend_url = self.backend.url
        self.middleware._notify("routed", self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None and self.outcome in ("internal", "ok", "backend_error"):
            self.outcome = "client_disconnected" if self.exchange.disconnected else _outcome_of(exc)
        ok = self.outcome in _OK_OUTCOMES or (self.outcome == "backend_error" and (self.status or 500) < 500)
        self.lease.release(ok=ok)
        self.middleware.monitor.observe(self.backend, self.outcome, self.status)
        # After `observe`, so a backend it just ejected is not handed to a waiter.
        self.middleware.admission.released(self.backend.id)
        # An overload answer retried elsewhere is not how the request ends: the next attempt, or
        # the 503 when none could take it, overwrites this.
        self.exchange.outcome = "no_capacity" if self.outcome == "overloaded" else self.outcome
        if self.sent_s:
            self.middleware.metrics.of(self.backend.url).latency.observe(time.perf_counter() - self.sent_s)
        if self.outcome in ("ok", "backend_error"):
            self.middleware._notify("completed", self, self.status)
        else:
            self.middleware._notify("failed", self, self.status, self.outcome)

    async def run(self) -> bool:
        middleware, exchange = self.middleware, self.exchange
        upstream = middleware._upstream
        assert upstream is not None
        scope = exchange.scope
        url = self.backend.url + scope["path"]
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        headers = request_headers(scope["headers"])
        self.sent_s = time.perf_counter()
        try:
            response = await upstream.send(scope["method"], parsed_url(url), headers, exchange.body)
        except httpx.HTTPError as error:
            return await self._failed_before_answer(error, "connect_error", "unreachable")
        try:
            if response.status_code in self.backend.adapter.overload_statuses and self._retry_overloaded(
                response.status_code
            ):
                return True
            chunks = response.aiter_raw()
            held = b""
            if self.backend.adapter.overload_in_stream and _is_event_stream(response):
                try:
                    held = await _first_event(chunks)
                except httpx.HTTPError as error:
                    return await self._failed_before_answer(
                        error, "upstream_error", "broke off before its first event"
                    )
                # The status TGI gives the same overload outside a stream (protocols.md §3.4).
                if self.backend.adapter.stream_overloaded(held) and self._retry_overloaded(429):
                    return True
            await self._relay(response, chunks, held)
        finally:
            await response.aclose()
        return False

    async def _failed_before_answer(self, error: httpx.HTTPError, retriable_outcome: Outcome, what: str) -> bool:
        # Nothing reached the client yet. A failure the backend may not have acted on is retried
        # elsewhere (True); any other is answered 502/504 here (False).
        if isinstance(error, _RETRIABLE):
            self.outcome = retriable_outcome
            log.warning("backend %s %s (attempt %d): %r", self.backend.url, what, self.number, error)
            return True
        self.outcome = _outcome_of(error)
        await self.middleware._send_error(self.exchange, *_upstream_failure(self.outcome))
        return False

    def _retry_overloaded(self, status: int) -> bool:
        # An overload answer is retried on another backend while retries remain and one could take
        # it; otherwise the backend's own answer is relayed, as the honest reply.
        middleware = self.middleware
        if self.number > middleware.config.retries.connect_attempts:
            return False
        if not middleware.fleet.has_other(self.exchange.route, [*self.tried, self.backend.id]):
            return False
        self.outcome, self.status = "overloaded", status
        log.info("backend %s overloaded (%d); trying another", self.backend.url, status)
        return True

    async def _relay(self, response: httpx.Response, chunks: AsyncIterator[bytes], held: bytes) -> None:
        exchange, metrics = self.exchange, self.middleware.metrics
        self.status = response.status_code
        metrics.of(self.backend.url).ttfb.observe(time.perf_counter() - self.sent_s)
        self.middleware._notify("first_byte", self, self.status)
        send = exchange.send
        exchange.started = True
        headers = response_headers(response.headers.raw)
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        try:
            if held:
                await send({"type": "http.response.body", "body": held, "more_body": True})
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as error:
            # Headers are out: the only honest signal left is a broken connection, so end without
            # completing the response (the server then closes it) instead of faking a clean end.
            self.outcome = _outcome_of(error)
            log.warning("backend %s broke off a response: %r", self.backend.url, error)
            return
        exchange.done = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self.outcome = "ok" if self.status < 400 else "backend_error"


def _is_event_stream(response: httpx.Response) -> bool:
    return response.status_code == 200 and response.headers.get("content-type", "").startswith(
        "text/event-stream"
    )


async def _first_event(chunks: AsyncIterator[bytes]) -> bytes:
    """The stream's bytes up to the end of its first event (or all of it, if shorter, or the first
    `_PEEK_MAX` bytes). `chunks` stays open: relaying continues from where this stopped."""
    held = b""
    async for chunk in chunks:
        held += chunk
        if b"\n\n" in held or b"\r\n\r\n" in held or len(held) > _PEEK_MAX:
            break
    return held


def _outcome_of(error: BaseException | None) -> Outcome:
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


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1") or None
    return None


async def _watch_disconnect(exchange: _Exchange, task: asyncio.Task[Any]) -> None:
    while not exchange.done:
        message = await exchange.receive()
        if message["type"] == "http.disconnect":
            if not exchange.done:
                exchange.disconnected = True
                task.cancel()
            return


async def _read_body(exchange: _Exchange, limit: int) -> bytes:
    for name, value in exchange.scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise _Reject(413, f"Request body is larger than {limit} bytes.", "rejected")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await exchange.receive()
        if message["type"] == "http.disconnect":
            exchange.disconnected = True
            raise _Reject(499, "client disconnected", "client_disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _Reject(413, f"Request body is larger than {limit} bytes.", "rejected")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _routes_of(backends: Any) -> dict[str, tuple[Endpoint, BackendAdapter]]:
    # Exact paths are indexed once, so dispatch costs one dict lookup per request. The first
    # backend's adapter for a path handles it (OpenAI-compatible adapters agree on these paths).
    routes: dict[str, tuple[Endpoint, BackendAdapter]] = {}
    for backend in backends:
        for endpoint in backend.adapter.endpoints:
            if "{" not in endpoint.path:  # templates are matched by the adapter (`_matchers_of`)
                routes.setdefault(endpoint.path, (endpoint, backend.adapter))
    return routes


def _matchers_of(backends: Any) -> tuple[BackendAdapter, ...]:
    # Adapters with path parameters (Triton's /v2/models/{name}/infer) override `match`; they are
    # asked, one per type, only for paths the exact index does not know.
    found: dict[type[BackendAdapter], BackendAdapter] = {}
    for backend in backends:
        if type(backend.adapter).match is not BackendAdapter.match:
            found.setdefault(type(backend.adapter), backend.adapter)
    return tuple(found.values())


def _match(
    matchers: tuple[BackendAdapter, ...], method: str, path: str
) -> tuple[Endpoint, BackendAdapter] | None:
    for adapter in matchers:
        endpoint = adapter.match(method, path)
        if endpoint is not None:
            return endpoint, adapter
    return None


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """The app behind a standalone router: 404 for unrouted paths, and a lifespan that works."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "http":
        error = {
            "message": f"No route for {scope['path']}",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        }
        await _respond(send, 404, json.dumps({"error": error}).encode(), list(_JSON))


def create_app(config: RouterConfig, **options: Any) -> RoutingMiddleware:
    """A standalone router: the middleware in front of an app that answers 404 to anything else.
    `options` go to `RoutingMiddleware` (`plugins`, `entry_points`)."""
    return RoutingMiddleware(_not_found, config, **options)
