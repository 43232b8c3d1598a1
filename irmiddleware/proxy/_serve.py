"""`irmiddleware serve`: the routing proxy as a standalone server (uvicorn).

    irmiddleware serve --config router.toml
    irmiddleware serve --backend http://127.0.0.1:9001 --backend http://127.0.0.1:9002 --type vllm

Flags override the file's `[router]` keys; `--backend` entries replace its `[[backends]]`. With
`[admin] listen`, metrics, status and the admin API (`_admin`) are served on that port instead of
the traffic port. SIGHUP re-reads the file and applies its `[[backends]]` live (`_reload`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import signal
import sys
from collections.abc import Iterator
from typing import Any, Final

from irmiddleware._router import STRATEGIES
from irmiddleware.proxy._logs import configure_logging
from irmiddleware.proxy.config import (
    LOG_FORMATS,
    WORKERS_MAX,
    ConfigError,
    RouterConfig,
    check_listen,
    load_config,
    parse_config,
)
from irmiddleware.proxy.config._sections import check_workers

__all__ = [
    "admin_server",
    "build_config",
    "raise_open_files_limit",
    "serve_arguments",
    "serve_main",
    "traffic_server",
]

log = logging.getLogger("irmiddleware.proxy")

_YOUNG_THRESHOLD: Final = 7000
"""Net allocations between two young-generation collections in `serve` (Python's default: 700)."""

# Descriptors beyond the client and upstream connections: the listening socket, health checks,
# signal scrapers, logs, the interpreter's own files.
_SPARE_FILES = 64


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="irmiddleware serve", description="Run the routing proxy.")
    parser.add_argument("--config", help="TOML file ([router] and [[backends]]; see doc/proxy.md)")
    parser.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="URL",
        help="a backend (repeatable; default: the file's [[backends]])",
    )
    parser.add_argument("--type", default="vllm", help="adapter of --backend entries (default: vllm)")
    parser.add_argument(
        "--capacity", type=int, default=64, help="capacity of --backend entries (default: 64)"
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="model served by --backend entries (repeatable; default: asked of each backend)",
    )
    parser.add_argument(
        "--strategy",
        help=f"routing strategy ({', '.join(sorted(STRATEGIES))}, or a plugin's; default p2c)",
    )
    parser.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:8000)")
    parser.add_argument(
        "--transport", choices=["lean", "httpx"], help="upstream transport (default lean; see doc/proxy.md)"
    )
    parser.add_argument(
        "--shutdown-grace",
        type=int,
        metavar="SECONDS",
        help="on SIGTERM, let requests in flight finish for at most this long (default: wait for all)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes on one shared-memory table (default: the file's, else 1; doc/workers.md)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="(default: info)"
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="log lines as text or one JSON object per line (default: the file's, else text)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        default=None,
        help="one log line per request, when it ends (default: the file's, else off)",
    )
    return parser


def build_config(args: argparse.Namespace) -> RouterConfig:
    """The configuration from `--config` and the flags; ConfigError when it is incomplete."""
    if args.config is None and not args.backend:
        raise ConfigError("give --config FILE or at least one --backend URL")
    if args.config is None:
        document: dict[str, Any] = {"backends": [{"url": url} for url in args.backend]}
        config = parse_config(document)
    else:
        config = load_config(args.config)
    overrides: dict[str, Any] = {}
    if args.backend:
        entries = [
            {"url": url, "type": args.type, "capacity": args.capacity, "models": args.model}
            for url in args.backend
        ]
        overrides["backends"] = parse_config({"backends": entries}).backends
    if args.strategy is not None:
        overrides["strategy"] = args.strategy
    if args.listen is not None:
        overrides["listen"] = check_listen(args.listen)
        if args.listen == config.admin.listen:
            raise ConfigError(f"--listen must differ from `admin.listen`, got {args.listen!r}")
    if args.transport is not None:
        overrides["transport"] = args.transport
    if args.log_format is not None:
        overrides["log_format"] = args.log_format
    if args.access_log is not None:
        overrides["access_log"] = args.access_log
    if args.workers is not None:
        if not 1 <= args.workers <= WORKERS_MAX:
            raise ConfigError(f"--workers must be in 1..{WORKERS_MAX}, got {args.workers}")
        check_workers(args.workers, config.shared_table)
        overrides["workers"] = args.workers
    if args.shutdown_grace is not None:
        if args.shutdown_grace < 0:
            raise ConfigError(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")
        overrides["shutdown_grace_s"] = args.shutdown_grace
    return dataclasses.replace(config, **overrides)


def serve_arguments(argv: list[str]) -> argparse.Namespace:
    """`irmiddleware serve`'s command line, parsed (the workers of `--workers N` read their
    supervisor's)."""
    return _parser().parse_args(argv)


def serve_main(argv: list[str] | None = None) -> int:
    """Runs the proxy until interrupted; returns the exit code (2 for a bad configuration). With
    `--workers N` (N > 1) a supervisor runs N worker processes (`irmiddleware.serve`)."""
    argv = sys.argv[1:] if argv is None else argv
    args = serve_arguments(argv)
    try:
        import uvicorn  # noqa: F401 (the message below names what is missing)

        from irmiddleware.proxy._admin import AdminAuth
        from irmiddleware.proxy._middleware import create_app
        from irmiddleware.proxy._server import edge_protocol  # noqa: F401 (needs httptools)

        config = build_config(args)
        configure_logging(args.log_level, config.log_format, access_log=config.access_log)
        if config.admin.listen:  # before the app exists: a refused start leaves nothing open
            AdminAuth(config.admin).check_source()
        # With workers, the supervisor builds the router (the app of its health checks and admin
        # listener) on the table it creates, and each worker its own.
        app = create_app(config, listen=config.listen) if config.workers == 1 else None
    except ImportError as error:
        needs = "irmiddleware serve needs uvicorn and httptools: pip install 'irmiddleware[serve]'"
        print(f"{needs} ({error})", file=sys.stderr)
        return 2
    except (ConfigError, ValueError) as error:
        print(f"irmiddleware serve: {error}", file=sys.stderr)
        return 2
    raise_open_files_limit(config)
    if app is None:
        from irmiddleware.serve import run_supervisor

        return run_supervisor(argv, config, args.log_level)
    return _run_servers(traffic_server(app, config, args.log_level), app, args)


def traffic_server(app: Any, config: RouterConfig, log_level: str) -> Any:
    """The uvicorn server of the traffic port (`config.listen`; a worker of `--workers N` hands
    its inherited socket to `serve(sockets=...)` instead): the client edge's bounds, no
    WebSocket, the router's own logs, readiness off first at shutdown."""
    import uvicorn

    from irmiddleware.proxy._server import edge_protocol
    from irmiddleware.proxy._shutdown import ReadinessFirstServer

    host, port = config.listen_host_port
    server_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        # The client edge: bounded heads, head/body/idle timeouts, a connection bound
        # (`[router.limits]`, `[router.timeouts]`). The router serves no WebSocket.
        http=edge_protocol(config, app.metrics.edge_refusals),
        ws="none",
        lifespan="on",
        log_level=log_level,
        log_config=None,  # `configure_logging` did it: uvicorn's lines in the router's format
        access_log=False,  # the router's own (`--access-log`) knows the backend and the outcome
        timeout_graceful_shutdown=config.shutdown_grace_s,
    )
    server = ReadinessFirstServer(server_config, app.begin_shutdown, config.probes.shutdown_delay_s)
    _tune_collector()
    return server


def _tune_collector() -> None:
    """Python's garbage collector, for a process that serves requests and holds few cycles
    (`irmiddleware serve` only: the drop-in middleware leaves its host's collector alone).

    Every object alive now (modules, configuration, the router) is frozen out of the collector's
    reach: its full passes otherwise walk those tens of thousands of objects every few thousand
    requests. And a young-generation pass runs every `_YOUNG_THRESHOLD` net allocations instead of
    700: the requests in flight are most of the young objects, and at the default every pass
    walked them, promoted them, and walked them again in the older generations, for nothing (a
    proxied request leaves no cycle behind). Measured under `bench-proxy --peers` load: the
    collector's CPU went from ~15 to ~4 us per request; a young pass takes a few milliseconds
    instead of a tenth of one, a few times a second at most."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def _run_servers(server: Any, app: Any, args: argparse.Namespace) -> int:
    """Runs the traffic server and, with `[admin] listen`, the admin listener in one event loop,
    with SIGHUP re-reading the configuration (`_reload`). Returns 3 when the traffic server could
    not start (as `uvicorn.run` exits)."""
    import asyncio

    from irmiddleware.proxy._reload import Reloader

    admin = admin_server(app, args.log_level)

    async def serve() -> None:
        reloader = Reloader(app, lambda: build_config(args))
        if hasattr(signal, "SIGHUP"):  # POSIX
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.reload_soon)
        admin_task = asyncio.create_task(admin.serve()) if admin is not None else None
        try:
            # On SIGTERM/SIGINT the traffic server shuts down gracefully, then re-raises the signal
            # (the process ends "killed by SIGTERM", as uvicorn does): the admin listener ends with it.
            await server.serve()
        finally:
            await reloader.aclose()
            if admin_task is not None:
                admin.should_exit = True
                await admin_task

    try:
        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
            runner.run(serve())
    finally:
        app.close()  # the native table; after a signal the process ends before this
    return 0 if server.started else 3


def admin_server(app: Any, log_level: str) -> Any:
    """The uvicorn server of `[admin] listen`, or None. It leaves the signals to the traffic
    server (whose shutdown ends both) and has no lifespan: the router's runs on the traffic side."""
    import uvicorn

    from irmiddleware.proxy._server import edge_protocol

    config = app.config
    if not config.admin.listen:
        return None
    host, _, port = config.admin.listen.rpartition(":")

    class AdminServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return AdminServer(
        uvicorn.Config(
            app.admin_app,
            host=host.strip("[]"),
            port=int(port),
            http=edge_protocol(config, app.metrics.edge_refusals),  # the same bounds, counted
            ws="none",
            lifespan="off",
            log_level=log_level,
            log_config=None,
            access_log=False,
        )
    )


def raise_open_files_limit(config: RouterConfig) -> None:
    """Raises the soft open-files limit to what `max_client_connections` and the upstream pool
    need (up to the hard limit). Below it the kernel's limit, not the configured bound, would cap
    client connections, and a flood of them would leave none for the upstream pool."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return
    need = config.limits.max_client_connections + config.limits.max_connections + _SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < need:
        log.warning(
            "open-files limit %d is below the %d that max_client_connections and max_connections "
            "need: the kernel will refuse connections first",
            target,
            need,
        )
