"""The fleet of `irmiddleware serve --workers N`, published by the supervisor to its workers.

The supervisor is the one process that changes the fleet (the admin API, SIGHUP, `[[discovery]]`):
it adds and removes backends in the shared table, then publishes the fleet's description (each
backend's id, URL, type and models: `Fleet.describe`) as a document with a generation number. Each
worker watches the generation, applies a new document to its own list of backends and pools
(`RoutingMiddleware.follow_fleet`) and acknowledges the generation it applied.

Two files in `/dev/shm`, beside the table:
- `irm-<table>.fleet.json`, the document, replaced whole (written aside, then renamed): a reader
  sees the old document or the new one, never a mix;
- `irm-<table>.fleet`, a board of 64 aligned 8-byte words: word 0 is the published generation,
  word k the generation worker k applied last. Each word has one writer, and its stores and loads
  are aligned 8-byte moves (ctypes), made in one piece on x86-64 and arm64. The word 0 only says
  that there is something new to read: the generation a worker applies and acknowledges is the
  one written in the document.

Why the acknowledgements: a removed backend's slot in the table is reused by the next backend
added. A worker that had not yet forgotten the removed backend would take the new one for it (its
URL, its models). So the supervisor adds a backend only once every running worker has applied the
last document (`settled`). A removal needs no wait: a removed backend was drained first, and the
table itself routes nothing more to it in any process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import mmap
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from irmiddleware.proxy._shared import OWNERS_MAX, beside

__all__ = ["FleetBoard", "board_paths"]

log = logging.getLogger("irmiddleware.proxy")

_WORDS: Final = OWNERS_MAX + 1
_SETTLE_POLL_S: Final = 0.005
SETTLE_MAX_S: Final = 10.0
"""How long an add waits for the workers to apply the last change (a worker still starting takes
a second or two) before it is refused with 503."""


def board_paths(table: str) -> tuple[str, str]:
    """The board's and the document's paths for `table`."""
    return beside(table, "fleet"), beside(table, "fleet.json")


class FleetBoard:
    """The board and the document of one table, as the supervisor (`create=True`) or a worker
    opens them."""

    def __init__(self, table: str, *, create: bool = False) -> None:
        self.path, self.document_path = board_paths(table)
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, _WORDS * 8)
            self._map = mmap.mmap(fd, _WORDS * 8)
        finally:
            os.close(fd)
        self._words = (ctypes.c_uint64 * _WORDS).from_buffer(self._map)

    @property
    def generation(self) -> int:
        """The generation published last."""
        return int(self._words[0])

    def applied(self, owner: int) -> int:
        """The generation worker `owner` applied last."""
        return int(self._words[owner])

    # ---- the supervisor --------------------------------------------------------------------------

    def publish(self, described: list[dict[str, Any]]) -> int:
        """Publishes a new document of the fleet `described`; returns its generation."""
        generation = self.generation + 1
        aside = f"{self.document_path}.{os.getpid()}"
        with open(aside, "w", encoding="utf-8") as file:
            json.dump({"generation": generation, "backends": described}, file)
        os.replace(aside, self.document_path)
        self._words[0] = generation  # after the document: a worker that sees it finds the document
        return generation

    async def settled(self, owners: Callable[[], Iterable[int]]) -> bool:
        """Waits until every worker in `owners()` (those running) applied the last generation:
        True then; False (logged) after `SETTLE_MAX_S`."""
        generation = self.generation
        deadline = time.monotonic() + SETTLE_MAX_S
        while True:
            behind = [owner for owner in owners() if self.applied(owner) < generation]
            if not behind:
                return True
            if time.monotonic() >= deadline:
                log.warning("workers %s have not applied generation %d of the fleet", behind, generation)
                return False
            await asyncio.sleep(_SETTLE_POLL_S)

    def remove(self) -> None:
        """Removes both files (the supervisor, at exit)."""
        self.close()
        for path in (self.path, self.document_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # ---- a worker --------------------------------------------------------------------------------

    def read(self) -> tuple[int, list[dict[str, Any]]]:
        """The document published last: (generation, backends)."""
        with open(self.document_path, encoding="utf-8") as file:
            document = json.load(file)
        return int(document["generation"]), list(document["backends"])

    def acknowledge(self, owner: int, generation: int) -> None:
        """Worker `owner` applied `generation`."""
        self._words[owner] = generation

    def close(self) -> None:
        if self._map.closed:
            return
        del self._words  # the map cannot close while a view of it lives
        self._map.close()
