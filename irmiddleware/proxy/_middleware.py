"""`RoutingMiddleware`: a pure-ASGI proxy in front of a fleet of inference servers.

Requests on the adapters' paths are routed to a backend serving the requested model and relayed
back unbuffered; everything else goes to the wrapped app. This module is the shell: dispatch by
path, the lifespan, reading a request, admission and the retry loop. One try on one backend is an
`Attempt` (`_attempt`), which owns the request's load from acquire to its one release; the router's
own answers (status, metrics, models, health) come from `_status`, the liveness and readiness
probes from `_probes`, and the access log and startup line from `_logs`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
from typing import Any, Final, Protocol

from irmiddleware import _plugins
from irmiddleware.hooks import AdapterError, BackendAdapter, Endpoint, RouteInfo
from irmiddleware.proxy._admin import AdminApp
from irmiddleware.proxy._admission import Admission, Shed
from irmiddleware.proxy._attempt import Attempt, AttemptContext, Releases, RequestObservers
from irmiddleware.proxy._exchange import (
    DISCONNECT_EXTENSION,
    ASGIApp,
    ClientExchange,
    Message,
    Receive,
    Reject,
    Scope,
    Send,
    send_error,
)
from irmiddleware.proxy._fleet import Fleet, FleetChangeRefused
from irmiddleware.proxy._logs import ACCESS_LOGGER, access_line, startup_summary
from irmiddleware.proxy._metrics import RouterMetrics
from irmiddleware.proxy._probes import Probes
from irmiddleware.proxy._routes import Routes, not_found
from irmiddleware.proxy._status import StatusResponder
from irmiddleware.proxy._upstream import Upstream
from irmiddleware.proxy.config import BackendConfig, RouterConfig
from irmiddleware.proxy.control import Discovery, FleetMonitor, SpeedCollector, SpeedFeed, check_resolvers

__all__ = ["Followers", "RoutingMiddleware", "create_app"]

log = logging.getLogger("irmiddleware.proxy")
access_log = logging.getLogger(ACCESS_LOGGER)

_PLAIN_ROUTES_MAX: Final = 1024  # (path, model) pairs whose RouteInfo is kept for reuse


class Followers(Protocol):
    """The other processes of a shared table that follow one router's fleet (`follow_fleet`)."""

    async def settled(self) -> bool:
        """Waits until every follower has applied the fleet's last change: True then, False when
        one has not within a bound."""


class RoutingMiddleware:
    """Routes inference requests to a fleet; passes every other request to `app`.

    `RoutingMiddleware(app, config)` builds the router and loads the plugins once. The upstream
    client is created at lifespan startup (or on the first request when the server runs without
    lifespan) and closed at shutdown. `plugins` are registered in addition to the `irmiddleware`
    entry points (handy in tests); `entry_points=False` loads only those. `listen` is where the
    server in front listens, for the startup line (`irmiddleware serve` gives it).
    `status_routes=False` leaves the metrics and status paths to `app` (default: answered here
    unless `[admin] listen` is set); `admin_app` serves them, and the admin API, wherever it is
    mounted.
    """

    def __init__(
        self,
        app: ASGIApp,
        config: RouterConfig,
        *,
        plugins: tuple[object, ...] = (),
        entry_points: bool = True,
        listen: str | None = None,
        status_routes: bool | None = None,
    ) -> None:
        self.app = app
        self.config = config
        self.plugin_manager, broken = _plugins.load_plugins(*plugins, entry_points=entry_points)
        # Before the native table exists: a discovery that cannot run is a configuration error.
        check_resolvers(config.discovery)
        self.registry = _plugins.collect(self.plugin_manager, broken)
        self.metrics = RouterMetrics(lambda: self.fleet.backend_stats())
        self.fleet = Fleet(config, self.registry, self.metrics)
        self.admission = Admission(
            config.admission,
            self.fleet,
            self.metrics.registry,
            config.retry_after_s,
            outage_retry_after_s=_outage_retry_after_s(config),
        )
        self.fleet.on_capacity(self.admission.capacity_appeared)
        self.monitor = FleetMonitor(self.fleet, config, self.plugin_manager, self.metrics.registry)
        self.discovery = Discovery(config.discovery, self, self.metrics.registry)
        self.responder = StatusResponder(config, self.fleet, self.monitor, self.admission, self.metrics)
        self.speed = _speed_feed(config, self.fleet, self.metrics)
        self.responder.speed = self.speed
        self._routes = Routes(self.fleet)
        self._admin_only = _admin_only_paths(config, status_routes)
        self._observers = RequestObservers(self.plugin_manager, self.fleet.strategy_name)
        self._attempts: AttemptContext | None = None  # built with the upstream client, at startup
        self._admin_app: ASGIApp | None = None
        self._start_lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._plain_routes: dict[tuple[str, str], RouteInfo] = {}  # `_read_request`'s shared routes
        self._session_header = config.affinity.session_header.lower().encode("latin-1")
        self.probes = Probes(
            config.probes, self.fleet, lambda path: self._routes.find("GET", path) is not None
        )
        self._access_log = access_log if config.access_log else None
        self._listen = listen
        self.followers: Followers | None = None
        """On a shared table, the processes that follow this router's fleet (`irmiddleware serve
        --workers`' supervisor sets it): without them, the fleet of a shared table is fixed."""

    @property
    def router(self) -> Any:
        """The native `Router` (stats, states, pools)."""
        return self.fleet.router

    def status(self) -> dict[str, Any]:
        """The JSON status document: strategy, models and every backend's state and load."""
        return self.responder.status()

    # ---- operating the fleet (any thread) -------------------------------------------------------

    def drain(self, backend_id: int) -> None:
        """Takes a backend out of routing until `undrain`: what is in flight completes, nothing
        new is sent, and health checks leave its state alone."""
        self.monitor.health.drain(backend_id)

    def undrain(self, backend_id: int) -> None:
        """Ends a drain: the backend is active again unless its health checks or an ejection keep
        it down, and requests waiting in admission are served at once."""
        self.monitor.health.undrain(backend_id)

    def update_backend(
        self, backend_id: int, *, capacity: int | None = None, weight: float | None = None
    ) -> None:
        """Changes a backend's capacity and/or weight while routing goes on; requests waiting in
        admission take a larger capacity at once."""
        self.fleet.update_backend(backend_id, capacity=capacity, weight=weight)

    def begin_shutdown(self) -> None:
        """Readiness answers 503 from now on, while routing goes on: a load balancer stops
        sending before the server stops. `irmiddleware serve` calls it on SIGTERM, the lifespan
        at shutdown; a server of one's own can call it at the start of its graceful shutdown.
        Safe from a signal handler or any thread."""
        self.probes.begin_shutdown()

    @property
    def admin_app(self) -> ASGIApp:
        """The admin ASGI app of this router: metrics, status and the admin API (`_admin`), for
        `irmiddleware serve`'s admin listener or to mount on a private port of your own."""
        if self._admin_app is None:
            self._admin_app = AdminApp(self)
        return self._admin_app

    async def add_backend(self, entry: BackendConfig, *, require_healthy: bool = True) -> int:
        """Adds a backend while routing goes on (on the event loop): it is probed and asked its
        models first, then joins the core, its pools, health checks and scraping in one step (and,
        with `followers`, returns once they route to it too).
        Returns its id. FleetChangeRefused: its URL is in the fleet (409), a model of another
        type (400), or, with `require_healthy`, it failed its probe or listed no model (502)."""
        self._check_changeable()
        self.fleet.check_new(entry)
        await self.startup()
        backend = self.fleet.new_backend(entry)
        healthy = await self.monitor.admit(backend)
        if not healthy and require_healthy:
            raise FleetChangeRefused(502, f"{entry.url} did not pass its health check or lists no model")
        # The new backend may take the slot of one removed a moment ago: every follower must have
        # forgotten that one first (and there is no await from here to the add).
        if self.followers is not None and not await self.followers.settled():
            raise FleetChangeRefused(503, "a worker has not applied the last change of the fleet; retry")
        self.fleet.check_new(dataclasses.replace(entry, models=backend.models))  # again: we awaited
        state = self.monitor.add(backend, healthy)
        self.fleet.add(backend, entry, state)
        self._routes = Routes(self.fleet)  # a new type brings its paths
        log.info("backend %s added as %d (%s, models %s)", backend.url, backend.id, state, backend.models)
        if self.followers is not None and not await self.followers.settled():
            log.warning("backend %s added; a worker has not followed yet", backend.url)
        return backend.id

    def remove_backend(self, backend_id: int) -> None:
        """Removes a drained backend (draining, nothing in flight) from the core, its pools, health
        checks and scraping in one step. FleetChangeRefused: unknown (404) or not drained (409)."""
        self._check_changeable()
        if backend_id not in self.fleet.backends:
            raise FleetChangeRefused(404, f"no backend {backend_id}")
        stats = self.fleet.router.accelerator_stats(backend_id)
        if stats.state != "draining" or stats.load or stats.requests_in_flight:
            raise FleetChangeRefused(
                409,
                f"backend {backend_id} is not drained (state {stats.state}, "
                f"{stats.requests_in_flight} in flight): drain it first",
            )
        backend = self.fleet.remove(backend_id)
        self.monitor.remove(backend)
        self._routes = Routes(self.fleet)
        log.info("backend %s (%d) removed", backend.url, backend_id)

    def follow_fleet(self, described: list[dict[str, Any]]) -> None:
        """Makes this router's fleet the one another process of its shared table `describe`d (a
        worker of `irmiddleware serve --workers` follows its supervisor's): backends that left are
        forgotten, new ones are routed to, watched for outliers and bring their paths."""
        joined, left = self.fleet.follow(described)
        for backend in left:
            self.monitor.remove(backend)
        for backend in joined:
            self.monitor.add(backend, True)  # its health is the writer's verdict, in the table
        if joined or left:
            self._routes = Routes(self.fleet)
            log.info("fleet followed: %d backends", len(self.fleet.backends))

    def _check_changeable(self) -> None:
        """On a shared table each process keeps its own list of backends and pools: a backend added
        or removed in one would be unknown to, or vanish under, the others, unless they follow this
        one (409)."""
        if self.fleet.shared_table is not None and self.followers is None:
            raise FleetChangeRefused(
                409, "backends are fixed on a shared table (workers): change the file and restart the router"
            )

    # ---- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, self._lifespan_receive(receive), send)
                return
            await self.app(scope, receive, send)
            return
        probe = self.probes.find(scope["path"], scope["method"])
        if probe is not None:
            await probe(send)
            return
        found = self._routes.find(scope["method"], scope["path"])
        if found is not None:
            await self._handle(scope, receive, send, *found)
        elif scope["path"] in self._admin_only or not await self.responder.answer(
            scope["path"], scope["method"], send
        ):
            await self.app(scope, receive, send)

    def _lifespan_receive(self, receive: Receive) -> Receive:
        async def receive_and_manage() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
            elif message["type"] == "lifespan.shutdown":
                self.begin_shutdown()
                await self.aclose()
            return message

        return receive_and_manage

    async def startup(self) -> None:
        """Creates the upstream client, discovers models and resolves the `[[discovery]]` names;
        idempotent."""
        started = False
        async with self._start_lock:
            if self._attempts is None:
                upstream = Upstream(self.config)
                await self.fleet.discover(upstream.client)
                await self.monitor.start()
                self._attempts = AttemptContext(
                    upstream=upstream,
                    fleet=self.fleet,
                    observe=self.monitor.observe,
                    metrics=self.metrics,
                    notify=self._observers,
                    retries=self.config.retries,
                    releases=Releases(self.config.timeouts.abort_grace_s, self.admission.released),
                    can_retry=self.admission.can_retry,
                    speed=self.speed,
                )
                started = True
        if started:
            # Outside the lock: discovery adds its backends with `add_backend`, which calls this.
            await self.discovery.start()
            startup_summary(log, self.fleet, self._listen)

    async def aclose(self) -> None:
        """Stops discovery, health checks and scrapers and closes the upstream client (lifespan
        shutdown)."""
        await self.discovery.aclose()
        await self.monitor.stop()
        attempts, self._attempts = self._attempts, None
        if attempts is not None:
            attempts.releases.flush()  # nothing is sent any more: no grace to keep
            await attempts.upstream.aclose()

    def close(self) -> None:
        """Frees the native routing table, for a middleware that is done for good (its server has
        stopped; the lifespan may have come and gone). Lifespan shutdown does not do this, because
        a test client can run an app's lifespan more than once. Idempotent; nothing can be routed
        afterwards."""
        self.admission.close()  # first: its release watcher waits on the router's table
        self.fleet.router.close()

    # ---- one request ---------------------------------------------------------------------------

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, endpoint: Endpoint, adapter: BackendAdapter
    ) -> None:
        if self._attempts is None:
            await self.startup()
        exchange = ClientExchange(scope, receive, send, adapter, next(self._ids))
        try:
            if endpoint.kind != "inference":
                await self.responder.answer_endpoint(endpoint, exchange)
                exchange.outcome = "ok"
                return
            await self._read_request(exchange, endpoint)
            exchange.route, exchange.body, ticket = self.admission.admit(
                scope["headers"], adapter, exchange.route, exchange.body
            )
            with ticket:  # the tenant's concurrency slot, held until the answer ends
                await self._route_watching_disconnect(exchange)
        except (Reject, Shed) as reject:
            exchange.outcome = reject.outcome
            retry_after_s = None
            if reject.status in (429, 503):
                retry_after_s = (
                    self.config.retry_after_s if reject.retry_after is None else reject.retry_after
                )
            await send_error(exchange, reject.status, reject.message, reject.param, retry_after_s)
        except Exception:
            log.exception("internal error while routing %s", scope["path"])
            exchange.outcome = "internal"
            await send_error(exchange, 500, "Internal router error.")
        finally:
            # A model label only for a model the fleet serves: never a name a client made up.
            model = exchange.route.model if self.fleet.serves(exchange.route.model) else "none"
            self.metrics.count(exchange.backend_url, model, exchange.outcome, exchange.status)
            if self._access_log is not None:
                access_line(self._access_log, exchange, model)

    async def _read_request(self, exchange: ClientExchange, endpoint: Endpoint) -> None:
        exchange.body = await _read_body(exchange, self.config.limits.max_body_bytes)
        scope = exchange.scope
        try:
            endpoint, exchange.adapter, model = self._routes.resolve(
                (endpoint, exchange.adapter), scope["method"], scope["path"], exchange.body
            )
        except AdapterError as error:
            raise Reject(error.status, error.message, "rejected", error.param) from None
        session_key = prompt = None
        if self.fleet.wants_session_key or self.fleet.wants_prompt:
            session_key, prompt = exchange.adapter.affinity_of(endpoint, exchange.body)
            header = _header(exchange.scope, self._session_header)
            session_key = header or session_key
        cost = self.fleet.cost.of(prompt, exchange.body) if self.fleet.cost.tokens else 1
        path = exchange.scope["path"]
        if session_key is None and prompt is None and cost == 1:
            # The usual route carries only its path and model: one immutable RouteInfo per pair
            # is shared (building one costs ~2 us), in a bounded cache.
            route = self._plain_routes.get((path, model))
            if route is None:
                if len(self._plain_routes) >= _PLAIN_ROUTES_MAX:
                    self._plain_routes.clear()
                route = self._plain_routes[(path, model)] = RouteInfo(path, model)
            exchange.route = route
            return
        exchange.route = RouteInfo(path, model, cost=cost, session_key=session_key, prompt=prompt)

    async def _route_watching_disconnect(self, exchange: ClientExchange) -> None:
        # The request body is read, so the next `receive()` returns only when the client goes
        # away (or after the response is complete). A watcher cancels the relay at once, which
        # closes the upstream connection and lets the backend stop generating.
        # Under `irmiddleware serve` the server calls us back instead (`DISCONNECT_EXTENSION`):
        # the same cancellation without a task per request.
        extensions = exchange.scope.get("extensions")
        watch = extensions.get(DISCONNECT_EXTENSION) if extensions else None
        watcher = None
        if watch is not None:
            # The server hands over the request's task, which it knows without asking asyncio
            # (whose `current_task()` costs a getpid() system call per call on Python 3.11).
            watch(lambda task: _disconnected(exchange, task))
        else:
            task = asyncio.current_task()
            assert task is not None
            watcher = asyncio.create_task(_watch_disconnect(exchange, task))
        try:
            await self._route(exchange)
        except asyncio.CancelledError:
            if not exchange.disconnected:
                exchange.outcome = "cancelled"
                raise
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            exchange.outcome = "client_disconnected"
        finally:
            exchange.done = True
            if watch is not None:
                watch(None)
            elif watcher is not None:
                watcher.cancel()

    async def _route(self, exchange: ClientExchange) -> None:
        # Every attempt goes through admission: the first may wait for capacity (or raise Shed);
        # a retry excludes the backends already tried and may wait too, but only until the
        # request's own admission deadline (doc/proxy.md, "Retries").
        attempts = self._attempts
        assert attempts is not None  # `_handle` started the router
        route = exchange.route
        deadline = self.admission.deadline(route)
        tried: list[int] = []
        attempt: Attempt | None = None
        for number in range(1, 2 + self.config.retries.connect_attempts):
            lease = await self.admission.acquire(route, exclude=frozenset(tried), deadline=deadline)
            if lease is None:
                break  # every backend that is up was tried
            if attempt is not None:
                self.metrics.retried(attempt.backend.url, attempt.outcome)
                log.info(
                    "request %s: retry %d after %s on %s",
                    exchange.request_id.decode(),
                    number - 1,
                    attempt.outcome,
                    attempt.backend.url,
                )
            async with Attempt(attempts, exchange, lease, number, tried) as attempt:
                if not await attempt.run():
                    return
            tried.append(lease.accelerator_id)
        if attempt is not None and attempt.outcome == "overloaded":
            raise Reject(503, f"No backend serving `{route.model}` has capacity; retry later.", "no_capacity")
        raise Reject(502, f"No backend serving `{route.model}` could be reached.", "connect_error")


def _outage_retry_after_s(config: RouterConfig) -> int:
    """`Retry-After` of a `no_healthy_backend` answer: how long a backend takes to come back at the
    soonest, `healthy_threshold` passing checks `interval_s` apart (without active checks, the
    first ejection's cool-down); at least 1 s."""
    if config.health.enabled:
        return max(1, math.ceil(config.health.interval_s * config.health.healthy_threshold))
    return max(1, math.ceil(config.outliers.base_ejection_s))


def _speed_feed(config: RouterConfig, fleet: Fleet, metrics: RouterMetrics) -> SpeedFeed | None:
    """Learned speed, when `[router.speed] enabled` or the strategy needs it (least_ttft)."""
    if not (config.speed.enabled or fleet.router.strategy == "least_ttft"):
        return None
    feed = SpeedFeed(fleet, config.speed, config.affinity.prefix_block_chars, config.tokens.chars_per_token)
    metrics.registry.register(SpeedCollector(feed))
    return feed


def _admin_only_paths(config: RouterConfig, status_routes: bool | None) -> frozenset[str]:
    """The paths this router leaves to the app: metrics and status when they are served only by
    the admin app (`status_routes=False`, or by default with an admin listener)."""
    if status_routes if status_routes is not None else not config.admin.listen:
        return frozenset()
    return frozenset((config.metrics_path, config.status_path))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1") or None
    return None


async def _watch_disconnect(exchange: ClientExchange, task: asyncio.Task[Any]) -> None:
    while not exchange.done:
        message = await exchange.receive()
        if message["type"] == "http.disconnect":
            _disconnected(exchange, task)
            return


def _disconnected(exchange: ClientExchange, task: asyncio.Task[Any]) -> None:
    """The client went away: the request's task is cancelled, unless its answer is complete."""
    if not exchange.done:
        exchange.disconnected = True
        task.cancel()


async def _read_body(exchange: ClientExchange, limit: int) -> bytes:
    for name, value in exchange.scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise Reject(413, f"Request body is larger than {limit} bytes.", "rejected")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await exchange.receive()
        if message["type"] == "http.disconnect":
            exchange.disconnected = True
            raise Reject(499, "client disconnected", "client_disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Reject(413, f"Request body is larger than {limit} bytes.", "rejected")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def create_app(config: RouterConfig, **options: Any) -> RoutingMiddleware:
    """A standalone router: the middleware in front of an app that answers 404 to anything else.
    `options` go to `RoutingMiddleware` (`plugins`, `entry_points`)."""
    return RoutingMiddleware(not_found, config, **options)
