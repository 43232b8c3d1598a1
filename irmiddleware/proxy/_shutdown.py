"""`irmiddleware serve`'s shutdown: readiness first, then uvicorn's graceful shutdown.

On the first SIGTERM/SIGINT the router's readiness probe answers 503 at once; the server keeps
accepting and serving for `[router.probes] shutdown_delay_s` (a load balancer polling readiness
stops sending meanwhile), then uvicorn stops accepting and lets requests in flight finish (for at
most `shutdown_grace_s`). A second signal during the delay starts the graceful shutdown at once; a
SIGINT after that forces the exit, as in uvicorn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

__all__ = ["ReadinessFirstServer"]

log = logging.getLogger("irmiddleware.proxy")


class ReadinessFirstServer(uvicorn.Server):
    """uvicorn's server that calls `begin_shutdown` (readiness off) at the first exit signal and
    starts its graceful shutdown `delay_s` later."""

    def __init__(self, config: uvicorn.Config, begin_shutdown: Callable[[], None], delay_s: float) -> None:
        super().__init__(config)
        self._begin_shutdown, self._delay_s = begin_shutdown, delay_s
        self._signal: int | None = None  # the signal whose shutdown waits for the delay
        self._stop_at = 0.0
        self._announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: it only sets attributes (the tick below acts on them, and logs: a
        # handler that logs could interleave with a line being written).
        self._begin_shutdown()
        if self._delay_s <= 0 or self.should_exit or self._signal is not None:
            self._signal = None
            super().handle_exit(sig, frame)
            return
        self._signal, self._stop_at = sig, time.monotonic() + self._delay_s

    async def on_tick(self, counter: int) -> bool:
        # uvicorn's main loop ticks every 0.1 s.
        if self._signal is not None and not self._announced:
            self._announced = True
            log.info("readiness off; the graceful shutdown starts in %g s", self._delay_s)
        if self._signal is not None and time.monotonic() >= self._stop_at:
            sig, self._signal = self._signal, None
            super().handle_exit(sig, None)
        return await super().on_tick(counter)
