"""One worker of `irmiddleware serve --workers N`: the proxy on the supervisor's socket and table.

A worker reads the same command line as its supervisor (so the same file and flags), then serves
it with three differences (`worker_config`): it attaches to the supervisor's table under the owner
index it was given, it runs no health checks and scrapes no signals (the supervisor's results are
in the table), and it keeps the states the table holds when it starts (a replacement must not
undo a drain or a health verdict). Its passive outlier ejections go to the table like every state
change, so every worker routes around the backend at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import sys
from typing import Any, Final

from irmiddleware._router import Router
from irmiddleware.proxy._logs import configure_logging
from irmiddleware.proxy._serve import build_config, raise_open_files_limit, serve_arguments, traffic_server
from irmiddleware.proxy._shared import assign_owner
from irmiddleware.proxy.config import RouterConfig

__all__ = ["worker_command", "worker_config", "worker_main"]

_BOOTSTRAP: Final = (
    "import sys; from irmiddleware.serve import worker_main; sys.exit(worker_main(sys.argv[1:]))"
)
_ORPHAN_CHECK_S: Final = 0.5


def worker_command(owner: int, fd: int, table: str, serve_argv: list[str]) -> list[str]:
    """The command that starts worker `owner` on the listening socket `fd` and `table`."""
    return [sys.executable, "-c", _BOOTSTRAP, str(owner), str(fd), table, *serve_argv]


def worker_config(config: RouterConfig, table: str) -> RouterConfig:
    """A worker's configuration: on `table`, one process, without health checks or signal scraping
    (the supervisor runs them for the whole router and writes their results to the table)."""
    return dataclasses.replace(
        config,
        workers=1,
        shared_table=table,
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

    states = _table_states(table)
    app = create_app(config, listen=config.listen)
    try:
        _restore_states(app.router, states)
        raise_open_files_limit(config)
        server = traffic_server(app, config, args.log_level)
        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
            runner.run(_serve(server, socket.socket(fileno=fd)))
    finally:
        app.close()
    return 0 if server.started else 3


def _table_states(table: str) -> dict[int, str]:
    """Every backend's state in the table now (the supervisor's verdicts and drains)."""
    with Router(shared_memory=table) as router:
        return {stats.id: stats.state for stats in router.stats()}


def _restore_states(router: Router, states: dict[int, str]) -> None:
    """Puts back the states a new worker's health bookkeeping set to its own starting state."""
    for backend_id, state in states.items():
        with contextlib.suppress(LookupError):
            if router.accelerator_stats(backend_id).state != state:
                router.set_state(backend_id, state)


async def _serve(server: Any, sock: socket.socket) -> None:
    """Serves on the inherited socket; a worker whose supervisor is gone shuts down gracefully."""
    parent = os.getppid()

    async def watch_parent() -> None:
        while os.getppid() == parent:
            await asyncio.sleep(_ORPHAN_CHECK_S)
        server.handle_exit(signal.SIGTERM, None)

    # A reload is the supervisor's business (which ignores it): SIGHUP must not end a worker.
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: None)
    watcher = asyncio.create_task(watch_parent())
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()
