"""Tenants' request rates as one limit for every process of a shared table.

A tenant's `rate_per_s` is a token bucket: `burst` tokens, refilled at `rate_per_s`, one taken per
admitted request. With one process the bucket is a pair of numbers in that process (`refill`).
On a shared table (`irmiddleware serve --workers N`, or the drop-in middleware given
`[router] shared_table`) N processes with a bucket each would admit N times the rate, so the
buckets live in a file beside the table, `/dev/shm/irm-<table>.rates`, mapped by every process:
4096 records of (tenant key hash, tokens, last refill, when the bucket is full again), found by
open addressing from the hash. Each take reads, refills and writes one record under an exclusive
`flock` of the file, held for a few microseconds by one process at a time; the kernel drops it
when its holder dies, `kill -9` included. A record whose bucket has refilled is as good as none,
so a new tenant may take it over: the file never fills with tenants long gone. When every record
near a tenant's hash is in use, that tenant is limited per process (logged once).

The clock is `time.monotonic`: the same system-wide clock in every process of the host.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import struct
from collections.abc import Iterator
from typing import Final

from irmiddleware.proxy._shared import TENANTS_MAX, beside

__all__ = ["FleetRates", "refill", "remove_rates_file"]

log = logging.getLogger("irmiddleware.proxy")

_RECORD: Final = struct.Struct("=Qddd")
"""Key hash (0: free), tokens, last refill (s), full again at (s)."""
_PROBES: Final = 16


def refill(tokens: float, since_s: float, now: float, rate_per_s: float, burst: float) -> float:
    """The tokens of a bucket that held `tokens` at `since_s`, at `now`."""
    return min(burst, tokens + max(0.0, now - since_s) * rate_per_s)


def remove_rates_file(table: str) -> None:
    """Removes `table`'s rates file (the supervisor, at exit)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(beside(table, "rates"))


class FleetRates:
    """The tenants' token buckets of one shared table, in its rates file (module docstring)."""

    def __init__(self, table: str) -> None:
        size = TENANTS_MAX * _RECORD.size
        self._fd = os.open(beside(table, "rates"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with self._locked():
                if os.fstat(self._fd).st_size < size:  # the first process sizes it (zeros: free)
                    os.ftruncate(self._fd, size)
            self._map = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        self._full_logged = False

    def take(self, key: str, rate_per_s: float, burst: float, now: float) -> float | None:
        """Refills `key`'s bucket to `now` and takes one token if it holds one; returns the
        tokens it held before (below 1: nothing taken, the request is over the rate). None when
        no record is free for it: the caller limits it per process."""
        digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") | 1
        with self._locked():
            offset = self._find(digest, now)
            if offset is None:
                if not self._full_logged:
                    self._full_logged = True
                    log.warning("the fleet-wide rates file is full: some tenants are limited per process")
                return None
            found, tokens, since_s, _full_at = _RECORD.unpack_from(self._map, offset)
            tokens = refill(tokens, since_s, now, rate_per_s, burst) if found == digest else burst
            left = tokens - 1 if tokens >= 1 else tokens
            full_at = now + (burst - left) / rate_per_s
            _RECORD.pack_into(self._map, offset, digest, left, now, full_at)
        return tokens

    def _find(self, digest: int, now: float) -> int | None:
        """The offset of `digest`'s record, else of the first record it may take (free, or a
        bucket full again); None when there is neither within `_PROBES`."""
        start = digest % TENANTS_MAX
        spare = None
        for probe in range(_PROBES):
            offset = ((start + probe) % TENANTS_MAX) * _RECORD.size
            found, _tokens, _since_s, full_at = _RECORD.unpack_from(self._map, offset)
            if found == digest:
                return offset
            if spare is None and (found == 0 or full_at <= now):
                spare = offset
            if found == 0:
                break  # never used: the key was not placed further on
        return spare

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd < 0:
            return
        self._map.close()
        os.close(self._fd)
        self._fd = -1
