"""The liveness and readiness probes (`[router.probes]`), answered by the router itself on the
traffic port, never proxied.

- Liveness (`health_path`, default `/health`): 200 whenever the process serves. It reads nothing,
  so a busy or degraded fleet never gets a live router restarted.
- Readiness (`ready_path`, default `/ready`): 200 while the router can serve, by the `ready` rule:
  `every_model` (every model the fleet serves has an active backend) or `any_backend` (some
  backend is active); 503 otherwise, and from the start of a graceful shutdown on, so that a load
  balancer stops sending before requests in flight are cut.

A path an adapter of the fleet routes stays the adapter's: TGI's clients ask `/health` whether the
server can generate, and the router answers that from the fleet (a TGI fleet's liveness probe then
needs another `health_path`; a warning at startup says so).

A probe's answer is one read of the core's per-backend states (no JSON document, no metrics
export); the bodies of the usual answers are built once, here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from irmiddleware.proxy._exchange import JSON_HEADERS, Send, respond
from irmiddleware.proxy._fleet import Fleet
from irmiddleware.proxy.config import ProbesConfig

__all__ = ["Probes"]

log = logging.getLogger("irmiddleware.proxy")

# Probes are polled: no cache may keep an old answer.
_HEADERS: Final = (*JSON_HEADERS, (b"cache-control", b"no-store"))
_LIVE: Final = b'{"status":"ok"}'
_READY: Final = b'{"ready":true}'
_METHODS: Final = frozenset({"GET", "HEAD"})


class Probes:
    """Answers `GET`/`HEAD` on the two probe paths; `begin_shutdown` turns readiness off for good."""

    def __init__(self, config: ProbesConfig, fleet: Fleet, routed: Callable[[str], bool]) -> None:
        """`routed(path)`: whether an adapter of the fleet routes `GET path` (it keeps it)."""
        self._fleet = fleet
        self._every_model = config.ready == "every_model"
        self._paths: dict[str, Callable[[Send], Awaitable[None]]] = {}
        if config.enabled:
            wanted = (
                ("health_path", config.health_path, self._live),
                ("ready_path", config.ready_path, self._ready),
            )
            for key, path, answer in wanted:
                if routed(path):
                    log.warning(
                        "router.probes.%s %s is a path the fleet's adapters route; the router answers "
                        "it as theirs, so set another %s for the probe",
                        key,
                        path,
                        key,
                    )
                else:
                    self._paths[path] = answer
        self.shutting_down = False

    def find(self, path: str, method: str) -> Callable[[Send], Awaitable[None]] | None:
        """The answer of a probe request; None when `method path` is not one (one dict lookup)."""
        answer = self._paths.get(path)
        return answer if answer is not None and method in _METHODS else None

    def begin_shutdown(self) -> None:
        """Readiness answers 503 from now on (routing goes on). Safe to call from a signal handler
        or any thread: it sets one attribute."""
        self.shutting_down = True

    def not_ready(self) -> str | None:
        """Why the router is not ready; None when it is."""
        if self.shutting_down:
            return "shutting down"
        active = self._fleet.active_ids()
        if not self._every_model:
            return None if active else "no backend is active"
        models = self._fleet.models
        if not models:
            return "no model is served (discovery found none yet)"
        down = [model for model in models if not active & self._fleet.pool_of(model)]
        if down:
            return f"no active backend for {', '.join(down)}"
        return None

    async def _live(self, send: Send) -> None:
        await respond(send, 200, _LIVE, _HEADERS)

    async def _ready(self, send: Send) -> None:
        reason = self.not_ready()
        if reason is None:
            await respond(send, 200, _READY, _HEADERS)
        else:
            await respond(
                send,
                503,
                json.dumps({"ready": False, "reason": reason}, separators=(",", ":")).encode(),
                _HEADERS,
            )
