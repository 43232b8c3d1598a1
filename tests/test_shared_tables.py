"""Attaching to a shared table verifies its header: a copy of a real /dev/shm table with one
header field corrupted (each field in turn, then random byte flips) is attached and used through
the public API (acquire, release, stats) by a child process, which must end with exit status 0
every time. Each copy is either refused with a clean `SharedMemoryError` (always, for the fields
that fix the layout) or works correctly (the loads go back to what they were), never a signal or
another error.

`HEADER` mirrors `Header` in zig/table.zig; tests/test_mirror.py checks that they agree."""

from __future__ import annotations

import ctypes
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from irmiddleware import Accelerator, Router, prefix_hashes, unlink_shared

pytestmark = pytest.mark.slow  # starts a child process


class HEADER(ctypes.Structure):
    _fields_ = (
        ("magic", ctypes.c_uint64),
        ("layout_version", ctypes.c_uint32),
        ("backends_max", ctypes.c_uint32),
        ("tree_leaves_count", ctypes.c_uint32),
        ("idmap_count", ctypes.c_uint32),
        ("region_bytes", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("ready", ctypes.c_uint32),
        ("lock", ctypes.c_uint32),
        ("present_count", ctypes.c_uint32),
        ("slots_high_water", ctypes.c_uint32),
        ("index_enabled", ctypes.c_uint32),
        ("rr_cursor", ctypes.c_uint64),
        ("rng_state", ctypes.c_uint64),
        ("class_share_permille", ctypes.c_uint32 * 8),
        ("cost_in_flight_total", ctypes.c_uint64),
        ("weighted_capacity_total", ctypes.c_uint64),
        ("balance_epsilon_permille", ctypes.c_uint32),
        ("ring_enabled", ctypes.c_uint32),
        ("ring_count", ctypes.c_uint32),
        ("ring_points_max", ctypes.c_uint32),
        ("ring_points_per_backend", ctypes.c_uint32),
        ("prefix_sets_count", ctypes.c_uint32),
        ("prefix_clock", ctypes.c_uint64),
        ("signal_age_max_ms", ctypes.c_uint32),
        ("weighted_max", ctypes.c_uint64),
        ("layout_checksum", ctypes.c_uint64),
        ("owners_max", ctypes.c_uint32),
        ("owners_high_water", ctypes.c_uint32),
        ("generation_line_before", ctypes.c_uint8 * 8),
        ("release_generation", ctypes.c_uint64),
        ("generation_waiters", ctypes.c_uint32),
        ("generation_line_rest", ctypes.c_uint8 * 52),
    )


# Fields that fix where everything lies: covered by the layout checksum, any change is refused.
LAYOUT_FIELDS = {
    "magic", "layout_version", "backends_max", "tree_leaves_count", "idmap_count", "region_bytes",
    "flags", "ring_points_max", "ring_points_per_backend", "prefix_sets_count", "layout_checksum",
    "owners_max",
}  # fmt: skip
# Fields whose every value is safe (counters, cursors, hints): a change must leave the table usable.
FREE_FIELDS = {
    "rr_cursor", "rng_state", "cost_in_flight_total", "weighted_capacity_total", "prefix_clock",
    "signal_age_max_ms", "weighted_max", "generation_line_before", "release_generation",
    "generation_waiters", "generation_line_rest",
}  # fmt: skip
# The rest have bounds (flags 0/1, counts within the layout, shares 1 to 1000): all ones is refused.

SHM = Path("/dev/shm")
STRATEGIES = ("round_robin", "least_connections", "p2c", "consistent_hash", "prefix_affinity", "queue_aware")

CHILD = """
import json, sys
from irmiddleware import Router, prefix_hashes
from irmiddleware._errors import SharedMemoryError
STRATEGIES = STRATEGIES_HERE

def use(name):
    hashes = prefix_hashes("a prompt that is long enough for two blocks " * 4, 64)
    try:
        first = Router(STRATEGIES[0], shared_memory=name)
    except SharedMemoryError as error:
        return "refused:" + error.status
    routers = [first]
    try:
        routers += [Router(strategy, shared_memory=name) for strategy in STRATEGIES[1:]]
        before = {stats.id: stats.load for stats in first.stats()}
        for cost in (1, 3):
            for router in routers:
                lease = router.acquire(cost, affinity_key="user-7", prefix_hashes=hashes)
                if lease is not None:
                    lease.release()
                lease = router.acquire(cost)
                if lease is not None:
                    lease.release(ok=False)
        after = {stats.id: stats.load for stats in first.stats()}
        return "worked" if after == before else f"wrong: loads {before} -> {after}"
    finally:
        for router in routers:
            router.close()

for name in sys.argv[1:]:
    print(json.dumps([name, "started"]), flush=True)
    print(json.dumps([name, use(name)]), flush=True)
""".replace("STRATEGIES_HERE", repr(STRATEGIES))


def field_cases(original: bytes) -> Iterator[tuple[str, str, bytes]]:
    """(field, kind, corrupted copy): each field's lowest bit flipped, and each field all ones."""
    header_type = HEADER
    for name, field_type in header_type._fields_:
        offset = getattr(header_type, name).offset
        size = ctypes.sizeof(field_type)
        element = ctypes.sizeof(field_type._type_) if issubclass(field_type, ctypes.Array) else size
        for start in range(offset, offset + size, element):
            flipped = bytearray(original)
            flipped[start] ^= 1
            yield name, "bit", bytes(flipped)
            ones = bytearray(original)
            ones[start : start + element] = b"\xff" * element
            yield name, "ones", bytes(ones)


def random_flips(original: bytes, count: int) -> Iterator[tuple[str, str, bytes]]:
    rng = random.Random(16)
    for _ in range(count):
        copy = bytearray(original)
        for _flip in range(rng.randint(1, 3)):
            copy[rng.randrange(ctypes.sizeof(HEADER))] ^= rng.randint(1, 255)
        yield "random", "flips", bytes(copy)


def make_original(name: str) -> bytes:
    """A real table in use: tree, ring and prefix index built, a request in flight."""
    with Router(
        "least_connections", shared_memory=name, max_accelerators=16, prefix_index_entries=64
    ) as router:
        for index in range(4):
            router.add_accelerator(Accelerator(index, capacity=10 + index))
        held = router.acquire(2)
        for strategy in STRATEGIES:
            with Router(strategy, shared_memory=name) as other:
                hashes = prefix_hashes("a prompt that is long enough for two blocks " * 4, 64)
                lease = other.acquire(1, affinity_key="user-7", prefix_hashes=hashes)
                assert lease is not None
                lease.release()
        original = (SHM / f"irm-{name}").read_bytes()
        assert held is not None
        held.release()
    return original


REFUSED = {"refused:shared_corrupt", "refused:shared_incompatible"}


def allowed(field: str, kind: str) -> set[str]:
    """What attaching to and using a copy with `field` corrupted may end in."""
    if field in LAYOUT_FIELDS:
        return REFUSED
    if field in FREE_FIELDS:
        return {"worked"}
    if kind == "ones":
        return REFUSED
    return REFUSED | {"worked"}  # e.g. a lock taken, a count within its bounds, random flips


def test_corrupted_headers_are_refused_or_harmless(shared_name: str) -> None:
    original = make_original(shared_name)
    cases = list(field_cases(original)) + list(random_flips(original, 40))
    names = [f"{shared_name}-c{index}" for index in range(len(cases))]
    try:
        for name, (_field, _kind, data) in zip(names, cases, strict=True):
            (SHM / f"irm-{name}").write_bytes(data)
        result = subprocess.run(
            [sys.executable, "-c", CHILD, *names], capture_output=True, text=True, timeout=300
        )
    finally:
        for name in names:
            (SHM / f"irm-{name}").unlink(missing_ok=True)
    outcomes = dict(json.loads(line) for line in result.stdout.splitlines())
    last = next((name for name in reversed(names) if name in outcomes), None)
    assert result.returncode == 0, (result.returncode, last, result.stderr[-2000:])
    wrong = []
    for name, (field, kind, _data) in zip(names, cases, strict=True):
        if outcomes.get(name) not in allowed(field, kind):
            wrong.append((field, kind, outcomes.get(name)))
    assert wrong == []


def test_a_table_with_an_intact_header_attaches(shared_name: str) -> None:
    original = make_original(shared_name)
    unlink_shared(shared_name)
    (SHM / f"irm-{shared_name}").write_bytes(original)
    with Router("p2c", shared_memory=shared_name) as router:
        assert sorted(router.accelerators) == [0, 1, 2, 3]
        assert sum(stats.load for stats in router.stats()) == 2  # the request held when copied
