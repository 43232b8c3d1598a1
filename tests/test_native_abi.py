"""The C ABI edge: every exported function validates its arguments and answers invalid ones with
a status (`irm_route`, which returns a slot, with `-status`), never a crash. The fuzzing runs in a
child process, so a crash would show up as a failed test (with the signal) instead of taking
pytest down."""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from irmiddleware import _native
from irmiddleware._native import _lib, status_name

I32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
U32 = st.integers(min_value=0, max_value=2**32 - 1)
I64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
U64 = st.integers(min_value=0, max_value=2**64 - 1)


def make_table() -> _native.NativeTable:
    table = _native.NativeTable(8)
    for index in range(3):
        table.add(index, 10 + index)
    return table


TABLE = make_table()


def teardown_module() -> None:
    TABLE.close()  # the module's shared table, closed rather than left to interpreter exit


VALID_STATUSES = set(range(len(_native._STATUS_NAMES)))


def call(name: str, *args: object) -> str:
    status = getattr(_lib, name)(*args)
    assert status in VALID_STATUSES, (name, args, status)
    return status_name(status)


def handles() -> st.SearchStrategy[int]:
    return st.one_of(st.just(TABLE._handle), U32)


@settings(deadline=None)
@given(handle=handles(), strategy=U32, cost=I32, priority=U32)
def test_acquire_never_crashes(handle: int, strategy: int, cost: int, priority: int) -> None:
    out = ctypes.c_uint64()
    name = call("irm_acquire", handle, strategy, cost, priority, ctypes.byref(out))
    if handle != TABLE._handle:
        assert name == "invalid_handle"
    elif cost <= 0:
        assert name in ("invalid_cost", "invalid_strategy")
    if name == "ok" and out.value != _native.SLOT_NONE:
        TABLE.release(out.value, cost, 0, True)


@settings(deadline=None)
@given(handle=handles(), slot=U32, incarnation=U32, cost=I32, latency=U32, ok=U32)
def test_release_never_crashes_or_corrupts(
    handle: int, slot: int, incarnation: int, cost: int, latency: int, ok: int
) -> None:
    call("irm_release", handle, slot, incarnation, cost, latency, ok)
    # Nothing was acquired, so nothing can have been released: the table must still be idle.
    assert all(info.cost_in_flight == 0 for info in TABLE.snapshot())


@settings(deadline=None)
@given(handle=handles(), backend_id=U64, capacity=I64, weight=I64, slot=U32, state=U32)
def test_backend_calls_never_crash(
    handle: int, backend_id: int, capacity: int, weight: int, slot: int, state: int
) -> None:
    out = ctypes.c_uint32()
    name = call("irm_backend_add", handle, backend_id, capacity, weight, ctypes.byref(out))
    if name == "ok":
        call("irm_backend_remove", handle, out.value)
    if capacity <= 0 and handle == TABLE._handle:
        assert name == "invalid_capacity"
    call("irm_backend_update", handle, slot, capacity, weight, state)
    call("irm_backend_find", handle, backend_id, ctypes.byref(out))
    call("irm_backend_set_signals", handle, slot, state, state % 1200, backend_id)
    call("irm_backend_set_batch_slots", handle, slot, state)
    call("irm_table_set_class_share", handle, state % 10, slot % 1100)
    info = _native.SlotRecord()
    call("irm_backend_read", handle, slot, ctypes.byref(info))


@settings(deadline=None)
@given(handle=handles(), strategy=U32, low=U32, high=U32, cost=I32, priority=U32, ok=U32, latency=I32)
def test_route_and_complete_never_crash_and_release_exactly(
    handle: int, strategy: int, low: int, high: int, cost: int, priority: int, ok: int, latency: int
) -> None:
    result = _lib.irm_route(handle, strategy, low, high, cost, priority)
    if result >= 0:
        assert handle == TABLE._handle and cost > 0 and result < 3  # ids and slots coincide here
        assert TABLE.read(result).cost_in_flight == cost
    else:
        assert result == _native.ROUTE_NONE or -result in VALID_STATUSES
        assert TABLE.requests_count() == 0
    completed = call("irm_complete", handle, low, high, ok, latency)
    if result >= 0 and ok <= 1:
        assert completed == "ok"
    elif result >= 0:
        assert completed == "invalid_argument"  # nothing released: the record stays
        assert call("irm_complete", handle, low, high, 1, latency) == "ok"
    else:
        assert completed in ("invalid_handle", "invalid_argument", "unknown_request")
    assert TABLE.requests_count() == 0
    assert all(info.cost_in_flight == 0 for info in TABLE.snapshot())


def test_null_out_pointers_are_refused() -> None:
    handle = TABLE._handle
    assert call("irm_acquire", handle, 0, 1, 0, None) == "invalid_argument"
    assert call("irm_backend_add", handle, 99, 10, 1000, None) == "invalid_argument"
    assert call("irm_table_create", 4, 0, 0, None) == "invalid_argument"
    assert call("irm_abi_version", None) == "invalid_argument"
    assert call("irm_acquire_batch", handle, 0, 0, 4, None, None, None) == "invalid_argument"
    out = ctypes.c_uint32()
    assert call("irm_acquire_batch", handle, 0, 0, 4, None, None, ctypes.byref(out)) == "invalid_argument"
    assert call("irm_release_batch", handle, 4, None, None, None, 1, ctypes.byref(out)) == "invalid_argument"
    assert call("irm_table_snapshot", handle, None, 4, ctypes.byref(out)) == "invalid_argument"
    assert call("irm_backend_read", handle, 0, None) == "invalid_argument"
    ticket = ctypes.c_uint64()
    assert (
        call("irm_acquire_among", handle, 0, 1, 0, None, 3, None, ctypes.byref(ticket)) == "invalid_argument"
    )
    matched = ctypes.c_uint32()
    outs = (ctypes.byref(ticket), ctypes.byref(out), ctypes.byref(matched))
    # After (handle, strategy, cost, priority, key): has_key, hashes, hashes_count, slots,
    # slots_count, cursor, then the out-pointers: null ones, then has_key 2.
    affine = ("irm_acquire_affine", handle, 4, 1, 0, 0)
    assert call(*affine, 0, None, 5, None, 0, None, outs[0], None, None) == "invalid_argument"
    assert call(*affine, 2, None, 0, None, 0, None, *outs) == "invalid_argument"
    assert call("irm_prefix_hashes", b"abc", 3, 0, None, 0, ctypes.byref(out)) == "invalid_argument"
    assert call("irm_prefix_hashes", None, 3, 1, None, 0, ctypes.byref(out)) == "invalid_argument"
    assert call("irm_request_read", handle, 0, 0, None) == "invalid_argument"
    assert call("irm_requests_count", handle, None) == "invalid_argument"


def test_destroyed_handles_are_refused() -> None:
    table = _native.NativeTable(2)
    handle = table._handle
    table.close()
    table.close()  # idempotent
    out = ctypes.c_uint64()
    assert call("irm_acquire", handle, 0, 1, 0, ctypes.byref(out)) == "invalid_handle"
    assert call("irm_complete", handle, 0, 0, 1, -1) == "invalid_handle"
    assert -_lib.irm_route(handle, 0, 0, 0, 1, 0) == _native._STATUS_NAMES.index("invalid_handle")
    assert call("irm_table_destroy", handle) == "invalid_handle"


def test_table_sizes_are_checked() -> None:
    out = ctypes.c_uint32()
    assert call("irm_table_create", 0, 0, 0, ctypes.byref(out)) == "invalid_argument"
    assert call("irm_table_create", (1 << 20) + 1, 0, 0, ctypes.byref(out)) == "invalid_argument"
    assert call("irm_table_create", 4, (1 << 24) + 1, 0, ctypes.byref(out)) == "invalid_argument"
    assert call("irm_table_create", 4, 0, 0x80, ctypes.byref(out)) == "invalid_argument"


def test_a_batch_with_one_bad_cost_reserves_nothing() -> None:
    costs = _native.int32_array([1, 2, 0, 1])
    slots = _native.ticket_array(4)
    out = ctypes.c_uint32()
    assert (
        call("irm_acquire_batch", TABLE._handle, 0, 0, 4, costs, slots, ctypes.byref(out)) == "invalid_cost"
    )
    assert all(info.cost_in_flight == 0 for info in TABLE.snapshot())


def test_at_least_65536_backends_are_supported() -> None:
    table = _native.NativeTable(65_536)
    for index in range(65_536):
        table.add(index, 4)
    assert table.info() == (65_536, 65_536)
    slot = table.acquire(int(_native.StrategyCode.LEAST_CONNECTIONS), 1, 0)
    assert slot != _native.SLOT_NONE
    table.release(slot, 1, 0, True)
    table.close()


FUZZ_CHILD = """
import ctypes, random
from irmiddleware._native import _lib
rng = random.Random(5)
out = ctypes.c_uint32()
ticket = ctypes.c_uint64()
handle = ctypes.c_uint32()
_lib.irm_table_create(16, 64, 0, ctypes.byref(handle))
names = [n for n in dir(_lib) if n.startswith("irm_") and n not in ("irm_table_destroy", "irm_shared_unlink")]
values = [0, 1, -1, 2**31 - 1, -2**31, 2**32 - 1, 17, handle.value, handle.value + 256]
for _ in range(20000):
    function = getattr(_lib, rng.choice(["irm_acquire", "irm_release", "irm_acquire_on",
        "irm_backend_remove", "irm_backend_update", "irm_backend_set_signals", "irm_table_seed",
        "irm_table_set_class_share", "irm_backend_find", "irm_table_set_balance", "irm_route",
        "irm_complete", "irm_request_read", "irm_requests_count"]))
    args = []
    for argtype in function.argtypes:
        if argtype is ctypes.POINTER(ctypes.c_uint32):
            args.append(rng.choice([None, ctypes.byref(out)]))
        elif argtype is ctypes.POINTER(ctypes.c_uint64):
            args.append(rng.choice([None, ctypes.byref(ticket)]))
        elif argtype in (ctypes.c_uint32, ctypes.c_uint64):
            args.append(abs(rng.choice(values)))
        else:
            args.append(rng.choice(values))
    function(*args)
print("survived")
"""


@pytest.mark.slow
def test_random_calls_never_crash_the_process() -> None:
    result = subprocess.run([sys.executable, "-c", FUZZ_CHILD], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip() == "survived"


def test_python_constants_agree_with_the_core() -> None:
    # Each constant is written once on each side of the ABI; this is the one place that checks they
    # agree, against the Zig source and against what a new table actually does.
    source = (Path(__file__).resolve().parent.parent / "zig" / "table.zig").read_text()
    count = re.search(r"pub const classes_count: u32 = (\d+);", source)
    shares = re.search(r"default_class_share_permille = \[classes_count\]u32\{([^}]*)\}", source)
    assert count is not None and shares is not None
    assert int(count.group(1)) == _native.CLASSES_COUNT
    permille = tuple(int(value) for value in shares.group(1).split(","))
    assert permille == tuple(round(share * 1000) for share in _native.DEFAULT_CLASS_SHARES)
    table = _native.NativeTable(4)
    live = tuple(table.class_share(priority) for priority in range(_native.CLASSES_COUNT))
    assert live == _native.DEFAULT_CLASS_SHARES
    out = ctypes.c_uint32()
    assert call("irm_table_get_class_share", table._handle, _native.CLASSES_COUNT, ctypes.byref(out)) != "ok"
    table.close()


def test_batches_are_bounded_and_the_binding_splits_larger_ones() -> None:
    out = ctypes.c_uint32()
    count = _native.BATCH_COUNT_MAX + 1
    costs = _native.int32_array([1] * count)
    slots = _native.ticket_array(count)
    too_many = call("irm_acquire_batch", TABLE._handle, 0, 0, count, costs, slots, ctypes.byref(out))
    assert too_many == "invalid_argument"
    assert call("irm_release_batch", TABLE._handle, count, slots, costs, None, 1, ctypes.byref(out)) == (
        "invalid_argument"
    )
    with _native.NativeTable(2) as table:
        table.add(1, count)
        assert table.acquire_batch(0, 0, costs, slots) == count
        assert table.read(0).count_in_flight == count
        table.release_batch(slots, costs, None, True)
        assert table.read(0).count_in_flight == 0


def test_the_library_checks_its_assertions_as_configured() -> None:
    # The README's test command (and so CI) builds with zig/native.zon's mode: ReleaseSafe, so
    # the whole suite runs against a library whose every Zig assertion is checked.
    settings = (Path(__file__).resolve().parent.parent / "zig" / "native.zon").read_text()
    optimize = re.search(r'\.optimize = "(\w+)"', settings)
    assert optimize is not None
    if "IRM_OPTIMIZE" in os.environ or "IRM_LIBRARY" in os.environ:
        pytest.skip("the library was built or chosen by hand")
    assert _native.runtime_safety() == (optimize.group(1) in ("Debug", "ReleaseSafe"))
