"""Routers of one host on one shared-memory table: its name, this process's owner index, and the
core's reclaim protocol, in one place.

Several router processes (`irmiddleware serve --workers N`, or the drop-in middleware in each
worker of `uvicorn --workers N` given `[router] shared_table`) attach to one native table in
`/dev/shm`, so capacity is counted once for all of them. Each process that takes leases owns an
index in 1..63; the core records every reservation under its owner, so what a dead process held
can be given back exactly (doc/reclaim.md).

An index is held with a POSIX record lock on byte `k` of `/dev/shm/irm-<name>.owners`: the kernel
drops it the moment its process ends, however it ends (`kill -9` included), so a free lock means
nobody uses the index. A process reclaims an index only while it holds that index's lock:
- a process that starts takes the index it is given (the supervisor's workers) or the lowest free
  one, and first gives back, under each free lock, what a dead holder left (`sweep`);
- the supervisor, when a worker dies, takes its lock, reclaims, lets it go, and starts a
  replacement on the same index.

This module is the one place the proxy uses the core's owner API (`Router(owner=k)`,
`reclaim_owner`, `release_generation`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from irmiddleware import _native
from irmiddleware._router import Router

__all__ = [
    "OWNERS_MAX",
    "TENANTS_MAX",
    "Claim",
    "ReleaseWatcher",
    "assign_owner",
    "beside",
    "claim",
    "held_lock",
    "open_router",
    "reclaim",
    "release_generation",
    "remove_lock_file",
    "sweep",
    "tenants_table",
]

log = logging.getLogger("irmiddleware.proxy")

OWNERS_MAX: Final = _native.OWNERS_MAX - 1
"""Owner indexes 1..63: one per process that takes leases on one table."""
TENANTS_MAX: Final = 4096
"""Tenants with a concurrency limit that the fleet-wide table tracks at once."""
_LOCK_DIR: Final = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
_WAIT_S: Final = 0.05
"""The release watcher's longest sleep: how soon it ends once nothing waits, or after `close`."""

_assigned: int | None = None
"""The owner index the supervisor gave this process (0: the supervisor itself, which takes no
lease); None: claim the lowest free one."""


@dataclass(frozen=True, slots=True)
class Claim:
    """An owner index of a table held by this process (for the process's lifetime)."""

    table: str
    owner: int


_fds: dict[str, int] = {}
"""Per table, this process's one descriptor of its lock file: closing any descriptor of the file
would drop every lock the process holds on it."""
_held: dict[str, set[int]] = {}
"""Per table, the indexes this process holds: one per router it opened there (the core allows one
handle per index)."""


def assign_owner(owner: int) -> None:
    """Sets the owner index this process takes on every shared table (the supervisor calls it in
    each worker before the router opens; 0 = take none)."""
    global _assigned
    if not 0 <= owner <= OWNERS_MAX:
        raise ValueError(f"owner must be in 0..{OWNERS_MAX}, got {owner}")
    _assigned = owner


def tenants_table(name: str) -> str:
    """The name of the small table that holds the tenants' fleet-wide concurrency slots."""
    return f"{name}.tenants"


def beside(table: str, suffix: str) -> str:
    """The path of a file of `table`'s beside it (`/dev/shm/irm-<table>.<suffix>`): its owners'
    locks, the fleet board of `serve --workers`, the tenants' rate buckets."""
    return os.path.join(_LOCK_DIR, f"irm-{table}.{suffix}")


def _lock_path(table: str) -> str:
    return beside(table, "owners")


def _open_lock_file(table: str) -> int:
    return os.open(_lock_path(table), os.O_RDWR | os.O_CREAT, 0o600)


def _lock_fd(table: str) -> int:
    fd = _fds.get(table)
    if fd is None:
        fd = _fds[table] = _open_lock_file(table)
    return fd


def _try_lock(fd: int, owner: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, owner)
    except OSError:
        return False
    return True


def claim(table: str) -> Claim | None:
    """An owner index on `table` for a router this process opens: the assigned one, or the lowest
    index no process holds. None for the supervisor (assigned 0). RuntimeError when the index (or
    every index) is held."""
    if _assigned == 0:
        return None
    held = _held.setdefault(table, set())
    fd = _lock_fd(table)
    wanted = range(1, OWNERS_MAX + 1) if _assigned is None else (_assigned,)
    # A process's own locks never conflict with each other: the indexes it holds are skipped here.
    for owner in wanted:
        if owner not in held and _try_lock(fd, owner):
            held.add(owner)
            return Claim(table, owner)
    which = "every owner index" if _assigned is None else f"owner index {_assigned}"
    raise RuntimeError(f"{which} of shared table {table!r} is held by a live process")


@contextlib.contextmanager
def held_lock(table: str, owner: int) -> Iterator[bool]:
    """Holds the lock of `owner` on `table` for the block when it is free (yields True), else
    yields False. The supervisor reclaims a dead worker's index inside it."""
    fd = _open_lock_file(table)
    try:
        locked = _try_lock(fd, owner)
        yield locked
        if locked:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, owner)
    finally:
        os.close(fd)


def remove_lock_file(table: str) -> None:
    """Removes `table`'s lock file (the supervisor, once its table is unlinked)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_lock_path(table))


def open_router(strategy: str, table: str | None, **options: Any) -> Router:
    """A `Router` on `table` (created by the first process, attached by the others) as this
    process's owner, after giving back what dead holders of its index and of the free ones left
    (`sweep`: the core refuses an index that still holds a dead holder's reservations); a private
    `Router` when `table` is None."""
    if table is None:
        return Router(strategy, **options)
    held = claim(table)
    if held is None:
        return Router(strategy, shared_memory=table, **options)
    with Router(strategy, shared_memory=table, **options) as unowned:
        sweep(unowned, table, held.owner)
    return Router(strategy, shared_memory=table, owner=held.owner, **options)


def sweep(router: Router, table: str, own: int) -> None:
    """Reclaims what a dead holder left on `own` (whose lock this process holds) and, under each
    free lock, on every other index: nothing when they ended cleanly, or the supervisor reclaimed
    already. An index the core still sees alive (a recycled pid) is left as it is."""
    fd = _lock_fd(table)
    for owner in range(1, OWNERS_MAX + 1):
        if owner != own and (owner in _held.get(table, ()) or not _try_lock(fd, owner)):
            continue  # in use (by this process's other routers, or by another process)
        try:
            leases, cost = reclaim(router, owner)
        except ValueError as error:  # "owner_alive": never reclaim what may be in use
            log.warning("shared table %s: owner %d not reclaimed: %s", table, owner, error)
            continue
        finally:
            if owner != own:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, owner)
        if leases:
            log.warning(
                "shared table %s: reclaimed %d leases (%d cost) of dead owner %d", table, leases, cost, owner
            )


def reclaim(router: Router, owner: int) -> tuple[int, int]:
    """Gives back every reservation `owner` holds on `router`'s table: (leases, cost). Only with
    the owner's lock held (its process is gone)."""
    leases, cost = router.reclaim_owner(owner)
    return int(leases), int(cost)


def release_generation(router: Router) -> int:
    """A counter the core bumps on every release, capacity or state change in the table (any
    process)."""
    return int(router.release_generation())


class ReleaseWatcher:
    """Calls `wake()` on the event loop whenever the release generation of `router`'s table moves
    while `wanted()` holds (requests wait): one thread per router, blocked in the core's futex
    wait (`Router.wait_release`, without the GIL) and woken by a release in any process. It runs
    from `ensure` (a request starts waiting) until `wanted()` is false after a wake-up or
    `_WAIT_S`; wake-ups are coalesced, one call pending on the loop at a time. `close` stops it,
    before the router closes."""

    def __init__(self, router: Router, wake: Callable[[], object], wanted: Callable[[], bool]) -> None:
        self._router, self._wake, self._wanted = router, wake, wanted
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = False
        self._stopped = False

    def ensure(self, loop: asyncio.AbstractEventLoop) -> None:
        """Starts the thread unless it runs (on the loop, when a request starts waiting)."""
        with self._lock:
            if loop is not self._loop:  # a new loop (a test client runs several): nothing pending
                self._loop, self._pending = loop, False
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name="irm-release-watch", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        seen = release_generation(self._router)
        # Once at the start: a release between the first waiter's failed acquire and here.
        self._post()
        while True:
            with self._lock:
                if self._stopped or not self._wanted():
                    self._thread = None
                    return
            now = self._router.wait_release(seen, _WAIT_S)
            if now != seen:
                seen = now
                self._post()

    def _post(self) -> None:
        """Schedules one `wake()` on the loop, unless one is pending."""
        loop = self._loop
        if self._pending or loop is None:
            return
        self._pending = True
        try:
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nothing waits on it any more
            self._pending = False

    def _deliver(self) -> None:
        self._pending = False
        self._wake()

    def close(self) -> None:
        """Stops the thread and waits for it (at most `_WAIT_S`)."""
        with self._lock:
            self._stopped = True
            thread = self._thread
        if thread is not None:
            thread.join()
