"""Connections and the keep-alive pool: the transport's bytes on the wire, without HTTP parsing.

`Connection` is an `asyncio.Protocol` with a receive buffer the response reader pulls from, read
back pressure and write flow control; `Pool` holds them by origin with httpx's `Limits` semantics.
A pooled connection is handed out only after a check that it is still alive (`Connection.alive`):
a request is written at most once, so a connection must be known dead *before* the write to be
replaced (doc/proxy.md, "Upstream transport: what may be retried").
"""

from __future__ import annotations

import asyncio
import collections
import select
import time
import typing
from collections.abc import Callable, Mapping
from typing import Final, NamedTuple

import httpx

__all__ = ["Connection", "Origin", "Pool", "PoolStats"]

_HIGH_WATER: Final = 256 * 1024  # buffered, unread response bytes before reading is paused

Origin = tuple[str, str, int]
"""(scheme, host, port): what a keep-alive connection may be reused for."""


class PoolStats(NamedTuple):
    """A snapshot of the pool's books (`LeanTransport.stats`)."""

    open: int
    """Connections open or opening, idle or busy."""
    idle: int
    """Of those, idle in the pool."""
    stale: int
    """Idle connections found dead when about to be reused (the backend had closed them): replaced
    by another connection before anything was written, so no request was lost or sent twice."""


def _readable_check(fd: int) -> Callable[[], bool]:
    """A zero-timeout "is there anything to read on `fd`?". An idle keep-alive connection has nothing
    to read: readable means the backend closed it (EOF), reset it, or sent bytes nobody asked for.
    poll (not select) because select cannot watch descriptors above FD_SETSIZE (1024)."""
    if not hasattr(select, "poll"):  # Windows
        return lambda: bool(select.select([fd], [], [], 0)[0])
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return lambda: bool(poller.poll(0))


# ---- one connection ------------------------------------------------------------------------------


class Connection(asyncio.Protocol):
    """One TCP connection: a receive buffer the response reader pulls from, and write flow
    control. It does no parsing; the response reader (`_wire`) does."""

    def __init__(self, pool: Pool, origin: Origin) -> None:
        self.pool, self.origin = pool, origin
        self.transport: asyncio.Transport | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.eof = False
        self.error: BaseException | None = None  # why the connection was lost, if not a clean EOF
        self.closed = False
        self.idle_since = 0.0
        self.holds_slot = True  # counted in the pool's `total` until closed
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._readable: Callable[[], bool] = lambda: False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it: no isinstance.
        self.transport = typing.cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._readable = _readable_check(sock.fileno())

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

    @property
    def write_paused(self) -> bool:
        """The transport's write buffer is over its high-water mark: `drain` before writing on."""
        return self._drain is not None and not self.closed

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
        """Nothing the event loop has seen makes it unusable (the cheap check, at release)."""
        return not self.eof and not self.chunks and self.transport is not None

    def alive(self) -> bool:
        """Usable for the next request, as far as can be known before writing it: besides what the
        loop has seen (`reusable`), the socket itself is asked. A backend's FIN or RST can sit in
        the kernel's receive queue while the loop has not yet run its read callback (it is busy,
        or this is the same turn): writing then would hand the request to a connection the
        backend has already closed."""
        transport = self.transport
        return self.reusable and transport is not None and not transport.is_closing() and not self._readable()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.eof = self.closed = True


# ---- the pool ------------------------------------------------------------------------------------


class Pool:
    """Keep-alive connections by origin, with httpx's `Limits` semantics: `max_connections` open
    (or opening) in total, at most `max_keepalive_connections` idle, each idle for at most
    `expiry` seconds (`LeanTransport`'s `keepalive_expiry`, which replaces `limits.keepalive_expiry`).
    Idle connections are reused newest first (warmest), each after a check that it is `alive`."""

    def __init__(self, limits: httpx.Limits, expiry: float | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.max_connections = limits.max_connections
        self.max_idle = limits.max_keepalive_connections
        self.expiry = expiry
        self.idle: dict[Origin, list[Connection]] = {}
        self.idle_count = 0
        self.total = 0
        self.stale = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.closed = False

    async def acquire(self, origin: Origin, timeouts: Mapping[str, float | None]) -> Connection:
        """An idle, live connection to `origin`, else a new one once the limit allows."""
        while True:
            connection = self.idle_connection(origin)
            if connection is not None:
                return connection
            if self.max_connections is None or self.total < self.max_connections:
                return await self._connect(origin, timeouts.get("connect"))
            if not self._evict_other_idle():
                await self._wait_for_slot(timeouts.get("pool"))

    def idle_connection(self, origin: Origin) -> Connection | None:
        """An idle connection to `origin` checked alive, or None (then `acquire`)."""
        idle = self.idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            self.idle_count -= 1
            if self.expiry is None or now - connection.idle_since < self.expiry:
                if connection.alive():
                    if idle and self.expiry is not None and now - idle[0].idle_since >= self.expiry:
                        self.idle_count -= 1
                        self.discard(idle.pop(0))  # one expired connection closed per reuse: amortized
                    return connection
                self.stale += 1
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

    async def _connect(self, origin: Origin, timeout: float | None) -> Connection:
        if self.closed:
            raise httpx.ConnectError("The transport is closed.")
        self.total += 1
        connection = Connection(self, origin)
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

    def release(self, connection: Connection) -> None:
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

    def discard(self, connection: Connection) -> None:
        connection.close()
        self._free(connection)

    def lost(self, connection: Connection) -> None:
        """The connection closed, by either side (it may have been idle)."""
        idle = self.idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)
            self.idle_count -= 1
        self._free(connection)

    def _free(self, connection: Connection) -> None:
        # Exactly once per connection, whichever of close, loss or a failed connect comes first.
        if connection.holds_slot:
            connection.holds_slot = False
            self.total -= 1
            self._wake_one()

    def stats(self) -> PoolStats:
        return PoolStats(self.total, self.idle_count, self.stale)

    def close(self) -> None:
        self.closed = True
        for idle in list(self.idle.values()):
            for connection in list(idle):
                self.discard(connection)
        self.idle.clear()
        self.idle_count = 0
