"""The prefix cache an inference server keeps, modelled once for the emulators and the simulator.

Like vLLM's automatic prefix caching, a server keeps the blocks of recent prompts in an LRU, each
block named by a chained hash (block i's hash covers everything before its end, so two prompts share
a block hash exactly when they share that whole prefix). A new prompt reuses the longest run of its
blocks, from the first, that the cache holds, and its prefill is paid for the rest only.

Two packages model that server: `irmiddleware.testing` (the vLLM emulator, over real HTTP) and
`irmiddleware.sim` (every simulated accelerator). This module sits beside both rather than in either,
so that neither imports the other: the simulator must import without the `testing` extra (Starlette
and uvicorn), and the emulators have no reason to load the simulator. It needs the standard library
only, and whoever changes how a server caches prefixes changes it here, once.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence

__all__ = ["PrefixCache", "block_hashes"]


def block_hashes(text: str, block_chars: int) -> list[bytes]:
    """Chained hashes of the full blocks of `block_chars` characters of `text`: block i's hash
    covers every character before its end, so two texts share a block hash exactly when they share
    that whole prefix."""
    hashes = []
    previous = b""
    for start in range(0, len(text) - block_chars + 1, block_chars):
        chunk = text[start : start + block_chars].encode()
        previous = hashlib.blake2b(previous + chunk, digest_size=16).digest()
        hashes.append(previous)
    return hashes


class PrefixCache:
    """One server's cached blocks, least recently used first, at most `capacity_blocks` of them.

    Blocks are any hashable names (the emulator's blake2b digests, the simulator's 64-bit ints).
    `capacity_blocks` may be changed between uses; the next `store` evicts down to it.
    """

    __slots__ = ("blocks", "capacity_blocks")

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = capacity_blocks
        self.blocks: OrderedDict[Hashable, None] = OrderedDict()

    def cached_prefix(self, hashes: Sequence[Hashable]) -> int:
        """How many of `hashes`, from the first, are cached (a cache reuses a prefix only)."""
        blocks = self.blocks
        for count, block in enumerate(hashes):
            if block not in blocks:
                return count
        return len(hashes)

    def store(self, hashes: Sequence[Hashable]) -> None:
        """Caches `hashes` as the most recent blocks, evicting the least recently used."""
        if self.capacity_blocks == 0:
            return
        blocks = self.blocks
        # Only the last `capacity_blocks` can survive the eviction below; skip the rest.
        for block in hashes[-self.capacity_blocks :]:
            blocks[block] = None
            blocks.move_to_end(block)
        for _ in range(len(blocks) - self.capacity_blocks):
            blocks.popitem(last=False)

    def lookup_and_store(self, hashes: Sequence[Hashable]) -> int:
        """`cached_prefix`, then `store`: what a server does when a prompt starts."""
        hits = self.cached_prefix(hashes)
        self.store(hashes)
        return hits

    def clear(self) -> None:
        """A crashed server loses its cache."""
        self.blocks.clear()
