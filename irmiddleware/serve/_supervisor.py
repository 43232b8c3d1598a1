"""The supervisor of `irmiddleware serve --workers N`.

It owns what must exist once per router:
- the listening socket, bound here and inherited by every worker (as gunicorn's arbiter and
  uvicorn's `--workers` do). One accept queue for all: a connection waiting in it is taken by
  whichever worker is free, a worker that dies leaves the queued connections to the others (with
  SO_REUSEPORT each worker has its own queue, and the kernel resets what waited in a dead
  worker's), and the port stays held while a worker is replaced;
- the native table in `/dev/shm` (and the tenants' table), with a name unique to the run, unlinked
  at exit; the prometheus-client multiprocess directory, removed at exit;
- a router of its own on that table, which takes no lease: it runs the health checks and the
  signal scraper for the whole router (their results go to the table, where every worker routes
  by them) and the admin listener (`[admin] listen`: status, metrics of all processes, drains);
- the fleet: it alone adds and removes backends (the admin API, SIGHUP's reload, `[[discovery]]`)
  and publishes each change to the workers, which follow it (`_board`);
- the workers: started with their owner index 1..N; one that dies has its reservations reclaimed
  (under its index's lock, `_shared`) and is replaced on the same index.

SIGHUP re-reads the configuration and applies the difference in its backends and discovery names,
as a single router does (`_reload`). SIGTERM/SIGINT: readiness off (each worker answers 503 on its
readiness path at once and keeps serving for `shutdown_delay_s`), then each worker's graceful
shutdown; the supervisor waits for all of them, then stops its own tasks and removes the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, Final

from irmiddleware._native import unlink_shared
from irmiddleware._router import Router
from irmiddleware.proxy._metrics import enable_multiprocess, mark_process_dead
from irmiddleware.proxy._rates import remove_rates_file
from irmiddleware.proxy._reload import Reloader
from irmiddleware.proxy._serve import admin_server, build_config, serve_arguments
from irmiddleware.proxy._shared import assign_owner, held_lock, reclaim, remove_lock_file, tenants_table
from irmiddleware.proxy.config import RouterConfig
from irmiddleware.serve._board import FleetBoard
from irmiddleware.serve._worker import worker_command

__all__ = ["Supervisor", "listen_socket", "run_supervisor"]

log = logging.getLogger("irmiddleware.proxy")

_POLL_S: Final = 0.05
"""How often the supervisor looks for a dead worker: its reservations come back within this."""
_BACKLOG: Final = 2048  # uvicorn's default
_QUICK_EXIT_S: Final = 2.0
_QUICK_EXITS_MAX: Final = 5
"""A worker that exits with an error within `_QUICK_EXIT_S` of its start this many times in a row
cannot start (a bad plugin, say): the supervisor stops instead of restarting it for ever."""


def listen_socket(config: RouterConfig) -> socket.socket:
    """The traffic port's socket, bound and listening, inheritable by the workers."""
    host, port = config.listen_host_port
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


@dataclasses.dataclass(slots=True)
class _Worker:
    owner: int
    process: subprocess.Popen[bytes]
    started_s: float
    quick_exits: int = 0


class Supervisor:
    """Runs `workers` worker processes of the command line `argv` (see the module docstring)."""

    def __init__(self, argv: list[str], config: RouterConfig, log_level: str) -> None:
        self.argv, self.config, self.log_level = argv, config, log_level
        self.table = f"serve-{os.getpid()}-{secrets.token_hex(4)}"
        self.metrics_dir = tempfile.mkdtemp(prefix="irm-metrics-")
        self.workers: dict[int, _Worker] = {}
        self.reclaimed: dict[int, tuple[int, int]] = {}
        """Per owner index, the (leases, cost) reclaimed from its dead workers so far."""
        self.board: FleetBoard | None = None
        self._stopping = 0  # exit signals received
        self._failed = False

    def run(self) -> int:
        """Serves until SIGTERM/SIGINT; returns 0, or 3 when the port or the workers could not
        start."""
        try:
            sock = listen_socket(self.config)
        except OSError as error:
            log.error("cannot listen on %s: %s", self.config.listen, error)
            return 3
        enable_multiprocess(self.metrics_dir)
        assign_owner(0)  # the supervisor's router takes no lease
        from irmiddleware.proxy._middleware import create_app

        try:
            app = create_app(self._own(self.config), listen=self.config.listen)
            try:
                self._publish_fleet(app)
                asyncio.run(self._main(app, sock))
            finally:
                app.close()
        finally:
            sock.close()
            self._remove_files()
        return 3 if self._failed else 0

    def _own(self, config: RouterConfig) -> RouterConfig:
        """The configuration of the supervisor's router: one process on the run's table."""
        return dataclasses.replace(config, workers=1, shared_table=self.table)

    def _publish_fleet(self, app: Any) -> None:
        """Publishes the fleet now and after each change of it, and lets the admin API, the
        reload and discovery change it (they wait for the workers to follow, `_board`)."""
        board = self.board = FleetBoard(self.table, create=True)
        board.publish(app.fleet.describe())
        app.fleet.on_change(lambda: board.publish(app.fleet.describe()))
        app.followers = _Workers(board, self)

    def running(self) -> list[int]:
        """The owner indexes of the workers running now."""
        return [owner for owner, worker in self.workers.items() if worker.process.poll() is None]

    async def _main(self, app: Any, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        await app.startup()  # health checks, signal scraping and discovery, once for the router
        admin = admin_server(app, self.log_level)
        admin_task = asyncio.create_task(admin.serve()) if admin is not None else None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, app, sig)
        reloader = Reloader(app, lambda: self._own(build_config(serve_arguments(self.argv))))
        loop.add_signal_handler(signal.SIGHUP, reloader.reload_soon)
        for owner in range(1, self.config.workers + 1):
            self._start(owner, sock)
        log.info(
            "supervisor %d: %d workers on %s, shared table %s",
            os.getpid(),
            self.config.workers,
            self.config.listen,
            self.table,
        )
        try:
            next_assert = 0.0
            while self.workers:
                await asyncio.sleep(_POLL_S)
                self._reap(app, sock)
                if time.monotonic() >= next_assert:
                    self._assert_health(app)
                    next_assert = time.monotonic() + self.config.health.interval_s
        finally:
            await reloader.aclose()
            if admin_task is not None:
                admin.should_exit = True
                await admin_task
            await app.aclose()

    def _start(self, owner: int, sock: socket.socket, quick_exits: int = 0) -> None:
        fd = sock.fileno()
        process = subprocess.Popen(
            worker_command(owner, fd, self.table, self.argv),
            pass_fds=(fd,),
            # A group of its own: a terminal's Ctrl-C reaches the supervisor alone, which passes
            # one signal on (two would cut the workers' graceful shutdown short).
            process_group=0,
        )
        self.workers[owner] = _Worker(owner, process, time.monotonic(), quick_exits)

    def _reap(self, app: Any, sock: socket.socket) -> None:
        """Reclaims what each dead worker held and starts its replacement (unless stopping)."""
        for owner, worker in list(self.workers.items()):
            code = worker.process.poll()
            if code is None:
                continue
            del self.workers[owner]
            mark_process_dead(worker.process.pid, self.metrics_dir)
            leases, cost = self.reclaim(app, owner)
            if self._stopping:
                log.info("worker %d (pid %d) ended with %s", owner, worker.process.pid, code)
                continue
            log.warning(
                "worker %d (pid %d) ended with %s; reclaimed %d leases (%d cost units); restarting it",
                owner,
                worker.process.pid,
                code,
                leases,
                cost,
            )
            # Only a worker that ended by itself (an error at startup) counts: one killed by a
            # signal was running, whenever that came.
            early = code > 0 and time.monotonic() - worker.started_s < _QUICK_EXIT_S
            quick = worker.quick_exits + 1 if early else 0
            if quick >= _QUICK_EXITS_MAX:
                log.error("worker %d cannot start (ended %d times at once); stopping", owner, quick)
                self._failed = True
                self._stop(app, signal.SIGTERM)
                continue
            self._start(owner, sock, quick)

    def reclaim(self, app: Any, owner: int) -> tuple[int, int]:
        """Gives back what the dead worker `owner` held, in the backends' table and the tenants'
        one: (leases, cost). Each under the index's lock of that table, so that no process takes
        the index (or sweeps it) meanwhile."""
        tables: list[tuple[str, Router]] = [(self.table, app.router)]
        if app.admission.fleet_tenants is not None:
            tables.append((tenants_table(self.table), app.admission.fleet_tenants.router))
        leases = cost = 0
        for table, router in tables:
            with held_lock(table, owner) as locked:
                if not locked:
                    log.error("owner %d of %s is still held: nothing reclaimed there", owner, table)
                    continue
                try:
                    more_leases, more_cost = reclaim(router, owner)
                except ValueError as error:  # the core sees the owner alive: never reclaim it
                    log.error("owner %d of %s not reclaimed: %s", owner, table, error)
                    continue
                leases, cost = leases + more_leases, cost + more_cost
        before = self.reclaimed.get(owner, (0, 0))
        self.reclaimed[owner] = (before[0] + leases, before[1] + cost)
        return leases, cost

    def _assert_health(self, app: Any) -> None:
        """A backend the health checks find failing is down in the table, whatever a worker wrote
        there since (a worker's ejection ends with its cool-down, not with a passing check)."""
        if not self.config.health.enabled:
            return
        for backend_id in list(app.fleet.backends):
            healthy = app.monitor.status_of(backend_id)["healthy"]
            if not healthy and app.router.accelerator_stats(backend_id).state == "active":
                app.fleet.set_state(backend_id, "down")

    def _stop(self, app: Any, sig: int) -> None:
        """An exit signal: readiness off here and in every worker (each starts its own graceful
        shutdown); a second SIGINT is passed on too, and forces them, as in uvicorn."""
        self._stopping += 1
        app.begin_shutdown()
        if self._stopping > 1 and sig != signal.SIGINT:
            return
        for worker in self.workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(sig)

    def _remove_files(self) -> None:
        if self.board is not None:
            self.board.remove()
        remove_rates_file(self.table)
        for name in (self.table, tenants_table(self.table)):
            with contextlib.suppress(OSError):  # the tenants' table exists only with tenant limits
                unlink_shared(name)
            remove_lock_file(name)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


class _Workers:
    """The supervisor's workers as the followers of its router's fleet."""

    def __init__(self, board: FleetBoard, supervisor: Supervisor) -> None:
        self._board, self._supervisor = board, supervisor

    async def settled(self) -> bool:
        return await self._board.settled(self._supervisor.running)


def run_supervisor(argv: list[str], config: RouterConfig, log_level: str) -> int:
    """`irmiddleware serve` with `workers` > 1: runs the supervisor until SIGTERM/SIGINT."""
    return Supervisor(argv, config, log_level).run()
