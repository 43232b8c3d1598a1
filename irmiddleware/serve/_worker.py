"""One worker of `irmiddleware serve --workers N`: the proxy on the supervisor's socket and table.

A worker reads the same command line as its supervisor (so the same file and flags), then serves
it with three differences (`worker_config`): it attaches to the supervisor's table under the owner
index it was given; it runs no health checks, scrapes no signals and resolves no `[[discovery]]`
name (the supervisor's results are in the table); and its backends are not the file's but the
fleet the supervisor published (`_board`), which it follows from then on. It never adds, removes
or sets the state of a backend it did not eject itself: a replacement must not undo a drain, a
health verdict or a change of the fleet. Its passive outlier ejections go to the table like every
state change, so every worker routes around the backend at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
from typing import Any, Final

from irmiddleware.proxy._logs import configure_logging
from irmiddleware.proxy._serve import build_config, raise_open_files_limit, serve_arguments, traffic_server
from irmiddleware.proxy._shared import assign_owner
from irmiddleware.proxy.config import RouterConfig
from irmiddleware.serve._board import FleetBoard

__all__ = ["worker_command", "worker_config", "worker_main"]

_BOOTSTRAP: Final = (
    "import sys; from irmiddleware.serve import worker_main; sys.exit(worker_main(sys.argv[1:]))"
)
_ORPHAN_CHECK_S: Final = 0.5
_FOLLOW_S: Final = 0.02
"""How often a worker looks for a new fleet document: the supervisor's adds wait for it."""

log = logging.getLogger("irmiddleware.proxy")


def worker_command(owner: int, fd: int, table: str, serve_argv: list[str]) -> list[str]:
    """The command that starts worker `owner` on the listening socket `fd` and `table`."""
    return [sys.executable, "-c", _BOOTSTRAP, str(owner), str(fd), table, *serve_argv]


def worker_config(config: RouterConfig, table: str) -> RouterConfig:
    """A worker's configuration: on `table`, one process, without health checks, signal scraping
    or discovery (the supervisor runs them for the whole router and writes their results to the
    table), and without backends of its own (it follows the supervisor's fleet)."""
    return dataclasses.replace(
        config,
        workers=1,
        shared_table=table,
        backends=(),
        discovery=(),
        health=dataclasses.replace(config.health, enabled=False),
        signals=dataclasses.replace(config.signals, enabled=False),
    )


def worker_main(argv: list[str]) -> int:
    """`OWNER FD TABLE SERVE-ARGS...`: serves until SIGTERM/SIGINT (or its supervisor is gone);
    returns 0, or 3 when the server could not start."""
    owner, fd, table, serve_argv = int(argv[0]), int(argv[1]), argv[2], argv[3:]
    assign_owner(owner)
    args = serve_arguments(serve_argv)
    config = worker_config(build_config(args), table)
    configure_logging(args.log_level, config.log_format)
    from irmiddleware.proxy._middleware import create_app

    board = FleetBoard(table)
    try:
        app = create_app(config, listen=config.listen)
        try:
            _follow(app, board, owner)
            raise_open_files_limit(config)
            server = traffic_server(app, config, args.log_level)
            with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
                runner.run(_serve(server, socket.socket(fileno=fd), app, board, owner))
        finally:
            app.close()
    finally:
        board.close()
    return 0 if server.started else 3


def _follow(app: Any, board: FleetBoard, owner: int) -> int:
    """Applies the supervisor's last published fleet to `app` and acknowledges it; returns its
    generation."""
    generation, described = board.read()
    app.follow_fleet(described)
    board.acknowledge(owner, generation)
    return generation


async def _serve(server: Any, sock: socket.socket, app: Any, board: FleetBoard, owner: int) -> None:
    """Serves on the inherited socket, following the supervisor's fleet; a worker whose
    supervisor is gone shuts down gracefully."""
    parent = os.getppid()

    async def watch_parent() -> None:
        while os.getppid() == parent:
            await asyncio.sleep(_ORPHAN_CHECK_S)
        server.handle_exit(signal.SIGTERM, None)

    async def watch_fleet() -> None:
        applied = board.applied(owner)
        while True:
            await asyncio.sleep(_FOLLOW_S)
            if board.generation != applied:
                try:
                    applied = _follow(app, board, owner)
                except Exception:  # keep following: the next change is applied whole
                    log.exception("worker %d: the fleet's last change was not applied", owner)

    # A reload is the supervisor's business: SIGHUP must not end a worker.
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: None)
    watchers = [asyncio.create_task(watch_parent()), asyncio.create_task(watch_fleet())]
    try:
        await server.serve(sockets=[sock])
    finally:
        for watcher in watchers:
            watcher.cancel()
