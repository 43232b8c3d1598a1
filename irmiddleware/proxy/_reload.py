"""Applying a re-read configuration to a running router (`irmiddleware serve` on SIGHUP).

The difference in `[[backends]]` is applied as the admin API would apply it: a new URL is added
(probed and asked its models; one that does not answer yet joins down, and its health checks bring
it in), a URL no longer listed is drained and removed once nothing is in flight on it, and a new
capacity or weight is set in place; a URL listed again before its drain is over stays (undrained).
`[[discovery]]` entries are applied by name (`Discovery.reconfigure`): a new name is resolved at
once, a name no longer listed has its backends drained and removed, a changed one applies its new
settings. Anything else that changed (a backend's type or models, the `[router]` keys) needs a
restart: it is logged, not applied. Backends that `[[discovery]]` added are its own, not the
file's: the `[[backends]]` difference leaves them alone. A file that does not load is refused with
one log line, and nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from irmiddleware.proxy._fleet import FleetChangeRefused
from irmiddleware.proxy._middleware import RoutingMiddleware
from irmiddleware.proxy.config import BackendConfig, ConfigError, RouterConfig
from irmiddleware.proxy.control import Removals, check_resolvers

__all__ = ["Reloader"]

log = logging.getLogger("irmiddleware.proxy")


class Reloader:
    """Re-reads the configuration with `load` and applies the difference to `middleware`."""

    def __init__(self, middleware: RoutingMiddleware, load: Callable[[], RouterConfig]) -> None:
        self._middleware = middleware
        self._load = load
        self._lock = asyncio.Lock()  # one reload at a time: a second SIGHUP waits for the first
        self._tasks: set[asyncio.Task[None]] = set()
        self._removals = Removals(middleware)
        """Backends drained by a reload, waiting to be removed."""

    def reload_soon(self) -> None:
        """The SIGHUP handler (on the event loop): starts a reload."""
        self._spawn(self.reload())

    async def reload(self) -> None:
        async with self._lock:
            try:
                config = self._load()
                check_resolvers(config.discovery)
            except (ConfigError, ValueError) as error:
                log.error("configuration reload refused, nothing changed: %s", error)
                return
            await self.apply(config)

    async def apply(self, config: RouterConfig) -> None:
        """Applies `config`'s discovery names, then its backends: added, drained then removed,
        capacity, weight and batch slots changed."""
        middleware = self._middleware
        _log_ignored(middleware.config, config)
        await middleware.discovery.reconfigure(config.discovery)
        discovered = middleware.discovery.backend_ids
        current = {b.url: b.id for b in middleware.fleet.backends.values() if b.id not in discovered}
        wanted = {entry.url: entry for entry in config.backends}
        for url, backend_id in current.items():
            if url not in wanted:
                self._removals.start(backend_id)
                continue
            self._removals.cancel(backend_id)  # listed again before its drain was over: it stays
            self._update(backend_id, wanted[url])
        for url, entry in wanted.items():
            if url not in current:
                try:
                    await middleware.add_backend(entry, require_healthy=False)
                except (FleetChangeRefused, ValueError) as error:
                    log.error("configuration reload: backend %s not added: %s", url, error)
        log.info("configuration reloaded: %d backends", len(middleware.fleet.backends))

    def _update(self, backend_id: int, entry: BackendConfig) -> None:
        middleware = self._middleware
        backend = middleware.fleet.backends[backend_id]
        if (backend.type, backend.metrics_url) != (entry.type, entry.metrics_url) or (
            entry.models and entry.models != backend.models
        ):
            log.warning(
                "configuration reload: the type, models or metrics_url of %s changed; remove it and add "
                "it again (or restart) to apply that",
                entry.url,
            )
        stats = middleware.fleet.router.accelerator_stats(backend_id)
        if (stats.capacity, stats.weight) != (entry.capacity, entry.weight):
            middleware.update_backend(backend_id, capacity=entry.capacity, weight=entry.weight)
            log.info("backend %s: capacity %d, weight %g", entry.url, entry.capacity, entry.weight)
        # The core keeps no copy to compare with: setting the same batch slots again is a no-op.
        middleware.fleet.router.set_batch_slots(backend_id, entry.batch_slots)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def aclose(self) -> None:
        """Cancels reloads and removals under way (at shutdown)."""
        tasks, self._tasks = set(self._tasks), set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._removals.aclose()


def _log_ignored(old: RouterConfig, new: RouterConfig) -> None:
    """Logs that the keys beyond `[[backends]]` and `[[discovery]]` changed: they are read once,
    at startup."""
    if dataclasses.replace(old, backends=(), discovery=()) != dataclasses.replace(
        new, backends=(), discovery=()
    ):
        log.warning(
            "configuration reload: only [[backends]] and [[discovery]] changes apply live; restart "
            "for the rest"
        )
