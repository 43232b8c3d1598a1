"""The binding to libirm, the Zig routing core: the only module that imports ctypes.

It loads the library once, declares `argtypes`/`restype` for every exported function, checks the
ABI version, and turns statuses into the typed exceptions of `_errors`.

The hot-path calls (`irm_acquire`, `irm_release`, `irm_route`, `irm_complete`) are also reached
through a second function object of the same symbol *without* argtypes: ctypes' per-argument
converters cost more than the routing decision itself (measured: 0.55 M vs 2.4 M call pairs/s).
Those symbols take only 32-bit integers and pointers, which ctypes passes as C ints (a u64 request
id travels in two halves); `NativeTable` checks every value's range before such a call, and the
core validates them again at its edge.

Every foreign call releases the GIL (`ctypes.CDLL`), so threads route in parallel; the seed API's
per-call pair (`irm_route`, `irm_complete`) keeps it (`ctypes.PyDLL`): their work in the core is
shorter than the GIL's round trip.

On CPython the seed API's plain calls skip ctypes altogether: the last section has the core make
two builtin functions per router and the type `Request` subclasses (zig/python.zig), from the
addresses of CPython functions taken from `ctypes.pythonapi`.
"""

from __future__ import annotations

import ctypes
import enum
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn

from irmiddleware import _errors

ABI_VERSION: Final = 7
SLOT_NONE: Final = 0xFFFF_FFFF
"""No slot; also the ticket the acquire calls return when nothing fits."""
TICKET_SLOT_MASK: Final = 0xFFFF_FFFF
"""A ticket (a reservation's name) is `incarnation << 32 | slot`: the slot is its low half."""
BACKENDS_MAX_LIMIT: Final = 1 << 20
CLASSES_COUNT: Final = 8
"""Priority classes of the core (`classes_count` in zig/table.zig): 0 is the most urgent, 7 the least."""
DEFAULT_CLASS_SHARES: Final = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5)
"""Share of capacity class k may fill in a new table (`default_class_share_permille`, zig/table.zig)."""
COST_MAX: Final = 2**31 - 1
CAPACITY_MAX: Final = 2**31 - 1
WEIGHT_MILLI_MAX: Final = 1_000_000
LATENCY_US_MAX: Final = 2**31 - 1  # passed as a C int on the hot path
FLAG_RACY_FOR_TESTS: Final = 1
PREFIX_ENTRIES_LIMIT: Final = 1 << 24
PREFIX_HASHES_MAX: Final = 1 << 16
BATCH_COUNT_MAX: Final = 1 << 16
"""The most entries one batch call takes (`batch_count_max`, zig/abi.zig); the binding splits
larger batches into calls of at most this many."""
ROUTE_NONE: Final = -(1 << 31)
"""`irm_route`'s result when nothing fits (`route_none`, zig/abi.zig)."""
ROUTE_SLOT_BASE: Final = -(1 << 30)
"""`irm_route`'s results from this one down name the slot of a backend whose id is 2**31 or
above: `ROUTE_SLOT_BASE - result` (`route_slot_base`, zig/abi.zig)."""
OWNERS_MAX: Final = 64
"""Owner records of a shared table (`owners_max`, zig/owners.zig): owners are 1..OWNERS_MAX-1."""
RELEASE_WAIT_MS_MAX: Final = 1000
"""The longest one `wait_release` call sleeps (`irm_release_wait`): callers loop."""
REQUEST_ID_MAX: Final = 2**64 - 1
"""Request ids `irm_route` records in the core (u64); the router keeps any other id itself."""
CallArgumentError: Final = ctypes.ArgumentError
"""What a converter-free call raises for an argument it cannot pass (a float, a string)."""


class StrategyCode(enum.IntEnum):
    """The core's strategy numbers, as in zig/strategies.zig (`hooks.Strategy` is the plugin-facing
    strategy object; `_router.STRATEGIES` maps names to these codes)."""

    ROUND_ROBIN = 0
    LEAST_CONNECTIONS = 1
    P2C = 2
    CONSISTENT_HASH = 3
    PREFIX_AFFINITY = 4
    QUEUE_AWARE = 5
    LEAST_TTFT = 6


class Outcome(enum.IntEnum):
    """How an affinity decision went, numbered as in zig/strategies.zig."""

    NONE = 0
    HIT = 1
    MISS = 2
    OVERLOAD = 3


class State(enum.IntEnum):
    """Backend states, numbered as in zig/table.zig."""

    ACTIVE = 1
    DRAINING = 2
    DOWN = 3
    RETIRED = 4


_STATUS_NAMES: Final = (
    "ok",
    "invalid_handle",
    "invalid_argument",
    "invalid_strategy",
    "invalid_cost",
    "invalid_capacity",
    "invalid_weight",
    "invalid_priority",
    "invalid_state",
    "unknown_backend",
    "duplicate_id",
    "table_full",
    "too_many_tables",
    "release_mismatch",
    "busy",
    "buffer_too_small",
    "out_of_memory",
    "shared_exists",
    "shared_not_found",
    "shared_incompatible",
    "invalid_name",
    "system_error",
    "shared_corrupt",
    "stale_release",
    "duplicate_request",
    "unknown_request",
    "owner_in_use",
    "owner_alive",
)

_STATUS_ERRORS: Final[dict[str, type[_errors.NativeError]]] = {
    "invalid_handle": _errors.InvalidHandleError,
    "invalid_argument": _errors.InvalidArgumentError,
    "invalid_strategy": _errors.InvalidArgumentError,
    "invalid_cost": _errors.InvalidArgumentError,
    "invalid_capacity": _errors.InvalidArgumentError,
    "invalid_weight": _errors.InvalidArgumentError,
    "invalid_priority": _errors.InvalidArgumentError,
    "invalid_state": _errors.InvalidArgumentError,
    "invalid_name": _errors.InvalidArgumentError,
    "unknown_backend": _errors.UnknownBackendError,
    "duplicate_id": _errors.DuplicateBackendError,
    "table_full": _errors.TableFullError,
    "too_many_tables": _errors.TableFullError,
    "release_mismatch": _errors.ReleaseMismatchError,
    "busy": _errors.BusyError,
    "buffer_too_small": _errors.BusyError,
    "out_of_memory": _errors.SharedMemoryError,
    "shared_exists": _errors.SharedMemoryError,
    "shared_not_found": _errors.SharedMemoryError,
    "shared_incompatible": _errors.SharedMemoryError,
    "system_error": _errors.SharedMemoryError,
    "shared_corrupt": _errors.SharedMemoryError,
    "stale_release": _errors.StaleReleaseError,
    # The router turns these two into the seed API's ValueError and KeyError with their messages.
    "duplicate_request": _errors.InvalidArgumentError,
    "unknown_request": _errors.NativeError,
    # Owners (zig/owners.zig): an index taken or out of range, a reclaim of a live owner.
    "owner_in_use": _errors.InvalidArgumentError,
    "owner_alive": _errors.InvalidArgumentError,
}


class SlotRecord(ctypes.Structure):
    """One slot's counters as the core lays them out (`BackendInfo` in zig/abi.zig): a row of
    `irm_table_snapshot` or the answer of `irm_backend_read`. `NativeTable.read` and `snapshot`
    return these rows as they are (`state` is a `State` number, `weight_milli` thousandths);
    `_router.AcceleratorStats` is the public, named view of one (`hooks.BackendInfo` is unrelated:
    a plugin's view of a configured backend)."""

    _fields_ = (
        ("id", ctypes.c_uint64),
        ("slot", ctypes.c_uint32),
        ("state", ctypes.c_uint32),
        ("capacity", ctypes.c_uint32),
        ("weight_milli", ctypes.c_uint32),
        ("cost_in_flight", ctypes.c_uint32),
        ("count_in_flight", ctypes.c_uint32),
        ("routed_total", ctypes.c_uint64),
        ("completed_total", ctypes.c_uint64),
        ("failed_total", ctypes.c_uint64),
        ("latency_us_ewma", ctypes.c_uint64),
        ("signal_queue_depth", ctypes.c_uint32),
        ("signal_kv_permille", ctypes.c_uint32),
        ("signal_time_ms", ctypes.c_uint64),
    )


_u32, _i32, _u64, _i64 = ctypes.c_uint32, ctypes.c_int32, ctypes.c_uint64, ctypes.c_int64
_pu32 = ctypes.POINTER(ctypes.c_uint32)
_pi32 = ctypes.POINTER(ctypes.c_int32)
_pu64 = ctypes.POINTER(ctypes.c_uint64)
_pchar = ctypes.c_char_p

_SIGNATURES: Final[dict[str, list[Any]]] = {
    "irm_abi_version": [_pu32],
    "irm_runtime_safety": [_pu32],
    "irm_table_create": [_u32, _u32, _u32, _pu32],
    "irm_table_create_shared": [_pchar, _u32, _u32, _u32, _u32, _pu32],
    "irm_table_attach_shared": [_pchar, _u32, _pu32],
    "irm_shared_unlink": [_pchar, _u32],
    "irm_table_destroy": [_u32],
    "irm_table_info": [_u32, _pu32, _pu32],
    "irm_table_seed": [_u32, _u64],
    "irm_table_set_class_share": [_u32, _u32, _u32],
    "irm_table_set_balance": [_u32, _u32],
    "irm_table_set_signal_age_max": [_u32, _u32],
    "irm_table_get_class_share": [_u32, _u32, _pu32],
    "irm_backend_add": [_u32, _u64, _i64, _i64, _pu32],
    "irm_backend_remove": [_u32, _u32],
    "irm_backend_update": [_u32, _u32, _i64, _i64, _u32],
    "irm_backend_find": [_u32, _u64, _pu32],
    "irm_backend_set_signals": [_u32, _u32, _u32, _u32, _u64],
    "irm_backend_set_ring_key": [_u32, _u32, _u64],
    "irm_backend_set_batch_slots": [_u32, _u32, _u32],
    "irm_backend_set_batch_timing": [_u32, _u32, ctypes.c_uint64, _u32],
    "irm_acquire": [_u32, _u32, _i32, _u32, _pu64],
    "irm_acquire_on": [_u32, _u32, _i32, _u32, _pu64],
    "irm_acquire_among": [_u32, _u32, _i32, _u32, _pu32, _u32, _pu64, _pu64],
    "irm_acquire_affine": [
        _u32,
        _u32,
        _i32,
        _u32,
        _u64,
        _u32,
        ctypes.POINTER(ctypes.c_uint64),
        _u32,
        _pu32,
        _u32,
        _pu64,
        _pu64,
        _pu32,
        _pu32,
    ],
    "irm_acquire_priced": [
        _u32,
        _u32,
        _i32,
        _u32,
        ctypes.POINTER(ctypes.c_uint64),
        _u32,
        _u32,
        _u32,
        _pu32,
        _u32,
        _pu64,
        _pu64,
        _pu32,
        _pu32,
        _pu32,
    ],
    "irm_prefix_hashes": [ctypes.c_void_p, _u32, _u32, ctypes.POINTER(ctypes.c_uint64), _u32, _pu32],
    "irm_acquire_batch": [_u32, _u32, _u32, _u32, _pi32, _pu64, _pu32],
    "irm_release": [_u32, _u32, _u32, _i32, _u32, _u32],
    "irm_release_batch": [_u32, _u32, _pu64, _pi32, _pu32, _u32, _pu32],
    "irm_table_snapshot": [_u32, ctypes.POINTER(SlotRecord), _u32, _pu32],
    "irm_backend_read": [_u32, _u32, ctypes.POINTER(SlotRecord)],
    "irm_route": [_u32, _u32, _u32, _u32, _i32, _u32],
    "irm_complete": [_u32, _u32, _u32, _u32, _i32],
    "irm_request_read": [_u32, _u32, _u32, _pu64],
    "irm_requests_count": [_u32, _pu64],
    "irm_owner_attach": [_u32, _u32],
    "irm_owner_reclaim": [_u32, _u32, _pu64, _pu64],
    "irm_owner_held": [_u32, _u32, _pu64, _pu64],
    "irm_owner_info": [_u32, _pu32, _pu32],
    "irm_release_generation": [_u32, _pu64],
    "irm_release_wait": [_u32, _u64, _u32, _pu64],
    "irm_python_bind": [_pu64, _u32, _pu64, _u32],
}
_RESULT_TYPES: Final[dict[str, Any]] = {}
"""Exports that return something other than an i32 status (`irm_route` returns an i32 that is
not one: see `NativeTable.route_call`)."""


def _library_path() -> Path:
    override = os.environ.get("IRM_LIBRARY")
    if override:
        return Path(override)
    return Path(__file__).parent / "_lib" / "libirm.so"


def _load() -> tuple[ctypes.CDLL, ctypes.CDLL, ctypes.PyDLL]:
    path = _library_path()
    try:
        checked = ctypes.CDLL(str(path))
        fast = ctypes.CDLL(str(path))
        holding_gil = ctypes.PyDLL(str(path))
    except OSError as error:
        raise _errors.NativeLibraryError(
            f"cannot load the native core {path}: {error}. Reinstall with `pip install .` "
            "(the build compiles it with the pinned ziglang package)."
        ) from error
    for name, argtypes in _SIGNATURES.items():
        function = getattr(checked, name)
        function.argtypes = argtypes
        function.restype = _RESULT_TYPES.get(name, ctypes.c_int32)
    version = ctypes.c_uint32()
    checked.irm_abi_version(ctypes.byref(version))
    if version.value != ABI_VERSION:
        raise _errors.NativeLibraryError(
            f"{path} has ABI version {version.value}, this binding needs {ABI_VERSION}; reinstall"
        )
    return checked, fast, holding_gil


_lib, _fast, _holding_gil = _load()
# Hot path: same symbols, no converters (see the module docstring). restype defaults to C int.
_fast_acquire = _fast.irm_acquire
_fast_release = _fast.irm_release
_fast_acquire_among = _fast.irm_acquire_among
# The seed API's calls keep the GIL: releasing and taking it back costs more than their work in the
# core (a bounded decision and a map update, never a wait on Python), and the Python around them
# holds the GIL anyway.
_fast_route = _holding_gil.irm_route
_fast_complete = _holding_gil.irm_complete
_LOW: Final = 0xFFFF_FFFF
_UNKNOWN_REQUEST: Final = _STATUS_NAMES.index("unknown_request")
_DUPLICATE_REQUEST: Final = _STATUS_NAMES.index("duplicate_request")


def runtime_safety() -> bool:
    """Whether the loaded library checks its assertions (built Debug or ReleaseSafe)."""
    enabled = ctypes.c_uint32()
    _check(_lib.irm_runtime_safety(ctypes.byref(enabled)), "runtime safety")
    return enabled.value == 1


def _chunks(count: int) -> range:
    """The starts of the batch calls that cover `count` entries."""
    return range(0, count, BATCH_COUNT_MAX)


def _part(array: Any, start: int, count: int) -> Any:
    """`array[start:start + count]` sharing its memory, for one chunk of a batch (None stays None)."""
    if array is None:
        return None
    return (array._type_ * count).from_buffer(array, start * ctypes.sizeof(array._type_))


def status_name(status: int) -> str:
    if 0 <= status < len(_STATUS_NAMES):
        return _STATUS_NAMES[status]
    return f"unknown_status_{status}"


def _raise(status: int, context: str) -> None:
    name = status_name(status)
    error_type = _STATUS_ERRORS.get(name, _errors.NativeError)
    raise error_type(name, f"{context}: {name.replace('_', ' ')}")


def _check(status: int, context: str) -> None:
    if status != 0:
        _raise(status, context)


def _not_ints(context: str, **values: object) -> _errors.InvalidArgumentError:
    """The error for hot-path arguments ctypes cannot pass as C ints (floats, strings, ...): the
    fast calls skip ctypes' converters, so this is where a wrong type surfaces."""
    wrong = ", ".join(f"{name}={value!r}" for name, value in values.items() if type(value) is not int)
    return _errors.InvalidArgumentError("invalid_argument", f"{context}: expected ints, got {wrong}")


def check_cost(cost: int) -> int:
    if type(cost) is not int or not 1 <= cost <= COST_MAX:
        raise _errors.InvalidArgumentError(
            "invalid_cost", f"cost must be an int in 1..{COST_MAX}, got {cost!r}"
        )
    return cost


def check_priority(priority: int) -> int:
    if type(priority) is not int or not 0 <= priority < CLASSES_COUNT:
        raise _errors.InvalidArgumentError(
            "invalid_priority",
            f"priority must be an int in 0..{CLASSES_COUNT - 1} (0 = most important), got {priority!r}",
        )
    return priority


def weight_to_milli(weight: float) -> int:
    milli = round(weight * 1000)
    if not 1 <= milli <= WEIGHT_MILLI_MAX:
        raise _errors.InvalidArgumentError(
            "invalid_weight", f"weight must be in 0.001..{WEIGHT_MILLI_MAX // 1000}, got {weight!r}"
        )
    return milli


def check_capacity(capacity: int) -> int:
    if type(capacity) is not int or not 1 <= capacity <= CAPACITY_MAX:
        raise _errors.InvalidArgumentError(
            "invalid_capacity", f"capacity must be an int in 1..{CAPACITY_MAX}, got {capacity!r}"
        )
    return capacity


def unlink_shared(name: str) -> None:
    """Removes a shared table's name (processes that mapped it keep their mapping)."""
    raw = name.encode()
    _check(_lib.irm_shared_unlink(raw, len(raw)), f"unlink shared table {name!r}")


class _OutParameter(threading.local):
    """A per-thread out-parameter for the core's results (created on first use in each thread)."""

    def __init__(self) -> None:
        self.out = ctypes.c_uint32()
        self.ref = ctypes.byref(self.out)
        self.ticket = ctypes.c_uint64()
        self.ticket_ref = ctypes.byref(self.ticket)


class NativeTable:
    """One backend table of the core, in private or named shared memory.

    Backends are addressed by slot (an index the core assigns); callers map their ids to slots.
    """

    __slots__ = ("_handle", "_local", "backends_max", "shared_name")

    def __init__(
        self,
        backends_max: int,
        *,
        prefix_entries: int = 0,
        shared_name: str | None = None,
        attach: bool = False,
        flags: int = 0,
    ) -> None:
        handle = ctypes.c_uint32()
        self._handle = 0
        self.shared_name = shared_name
        if shared_name is None:
            self._check_sizes(backends_max, prefix_entries)
            status = _lib.irm_table_create(backends_max, prefix_entries, flags, ctypes.byref(handle))
            _check(status, "create table")
        else:
            raw = shared_name.encode()
            if attach:
                status = _lib.irm_table_attach_shared(raw, len(raw), ctypes.byref(handle))
                _check(status, f"attach shared table {shared_name!r}")
            else:
                self._check_sizes(backends_max, prefix_entries)
                status = _lib.irm_table_create_shared(
                    raw, len(raw), backends_max, prefix_entries, flags, ctypes.byref(handle)
                )
                _check(status, f"create shared table {shared_name!r}")
        self._handle = handle.value
        # Out-parameters are per thread: a shared one lets a thread read another's result.
        self._local = _OutParameter()
        maximum, _present = self.info()
        self.backends_max = maximum

    def _out(self) -> tuple[Any, Any]:  # (c_uint32, byref to it)
        """This thread's out-parameter and a ready `byref` to it."""
        local = self._local
        return local.out, local.ref

    @staticmethod
    def _check_sizes(backends_max: int, prefix_entries: int) -> None:
        if type(backends_max) is not int or not 1 <= backends_max <= BACKENDS_MAX_LIMIT:
            raise _errors.InvalidArgumentError(
                "invalid_argument", f"max backends must be in 1..{BACKENDS_MAX_LIMIT}, got {backends_max!r}"
            )
        if type(prefix_entries) is not int or not 0 <= prefix_entries <= PREFIX_ENTRIES_LIMIT:
            raise _errors.InvalidArgumentError(
                "invalid_argument",
                f"prefix entries must be in 0..{PREFIX_ENTRIES_LIMIT}, got {prefix_entries!r}",
            )

    # ---- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Unmaps the table (idempotent). A shared table's name stays until `unlink_shared`.

        Safe while other threads use the table: their calls from now on raise
        InvalidHandleError, and the core unmaps only once the calls in progress are done.
        BusyError if those did not finish in time (the table stays closed; close again)."""
        handle = self._handle
        if not handle:
            return
        status = _lib.irm_table_destroy(handle)
        if status_name(status) == "busy":
            _raise(status, "destroy table (calls still in progress)")
        self._handle = 0
        if status_name(status) != "invalid_handle":  # invalid: a concurrent close finished it
            _check(status, "destroy table")

    def __enter__(self) -> NativeTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # The core has a fixed registry of table handles (256): a table left to the garbage
        # collector holds one until then. Like an unclosed file, that is worth a ResourceWarning
        # (the test suite turns it into an error).
        if getattr(self, "_handle", 0):
            warnings.warn(f"unclosed native table (handle {self._handle:#x})", ResourceWarning, stacklevel=1)
            _lib.irm_table_destroy(self._handle)

    def info(self) -> tuple[int, int]:
        """(maximum backends, backends present now)."""
        maximum, present = ctypes.c_uint32(), ctypes.c_uint32()
        _check(_lib.irm_table_info(self._handle, ctypes.byref(maximum), ctypes.byref(present)), "table info")
        return maximum.value, present.value

    def seed(self, seed: int) -> None:
        _check(_lib.irm_table_seed(self._handle, seed & (2**64 - 1)), "seed table")

    def set_class_share(self, priority: int, share: float) -> None:
        """Lets requests of `priority` fill a backend up to `share` (0 < share <= 1) of capacity."""
        permille = round(share * 1000)
        _check(_lib.irm_table_set_class_share(self._handle, priority, permille), f"share of class {priority}")

    def set_balance(self, epsilon: float) -> None:
        """Bounded-load slack ε (0 … 10) of consistent_hash and prefix_affinity."""
        _check(_lib.irm_table_set_balance(self._handle, round(epsilon * 1000)), "set balance epsilon")

    def set_signal_age_max(self, age_max_ms: int) -> None:
        """Server-reported signals older than this are ignored by `queue_aware`."""
        _check(_lib.irm_table_set_signal_age_max(self._handle, age_max_ms), "set signal age")

    def class_share(self, priority: int) -> float:
        out, out_ref = self._out()
        _check(_lib.irm_table_get_class_share(self._handle, priority, out_ref), f"share of class {priority}")
        return float(out.value) / 1000

    # ---- backends ------------------------------------------------------------------------------

    def add(self, backend_id: int, capacity: int, weight_milli: int = 1000) -> int:
        slot = ctypes.c_uint32()
        status = _lib.irm_backend_add(self._handle, backend_id, capacity, weight_milli, ctypes.byref(slot))
        _check(status, f"add backend {backend_id}")
        return slot.value

    def remove(self, slot: int) -> None:
        _check(_lib.irm_backend_remove(self._handle, slot), f"remove backend in slot {slot}")

    def update(self, slot: int, capacity: int, weight_milli: int, state: State) -> None:
        status = _lib.irm_backend_update(self._handle, slot, capacity, weight_milli, int(state))
        _check(status, f"update backend in slot {slot}")

    def find(self, backend_id: int) -> int:
        slot = ctypes.c_uint32()
        _check(
            _lib.irm_backend_find(self._handle, backend_id, ctypes.byref(slot)), f"find backend {backend_id}"
        )
        return slot.value

    def set_signals(self, slot: int, queue_depth: int, kv_usage: float, time_ms: int) -> None:
        """`time_ms` is `time.monotonic() * 1000` when the signals were read (the core's clock)."""
        status = _lib.irm_backend_set_signals(
            self._handle, slot, queue_depth, round(kv_usage * 1000), time_ms
        )
        _check(status, f"signals of slot {slot}")

    def set_ring_key(self, slot: int, key: int) -> None:
        """Places the slot's backend on the consistent-hashing ring by `key` (0: by its id)."""
        _check(_lib.irm_backend_set_ring_key(self._handle, slot, key), f"ring key of slot {slot}")

    def set_batch_slots(self, slot: int, batch_slots: int) -> None:
        """How many requests the slot's engine runs at once (0: not known); least_ttft counts
        only the requests beyond them as a queue."""
        _check(
            _lib.irm_backend_set_batch_slots(self._handle, slot, batch_slots), f"batch slots of slot {slot}"
        )

    def set_batch_timing(self, slot: int, slot_free_ms: int, service_ms: int) -> None:
        """When the slot's batch next frees a slot (`time.monotonic()` ms) and how long one
        request's service takes there (ms); 0 and 0: not known."""
        _check(
            _lib.irm_backend_set_batch_timing(self._handle, slot, slot_free_ms, service_ms),
            f"batch timing of slot {slot}",
        )

    # ---- routing -------------------------------------------------------------------------------

    def acquire(self, strategy: int, cost: int, priority: int) -> int:
        """Reserves `cost`; returns the reservation's ticket (`slot_of_ticket` names its slot;
        give it to `release`), or SLOT_NONE when nothing fits. Arguments must be in range
        (callers check them once, e.g. in `Request`), see the module docstring."""
        local = self._local
        try:
            status = _fast_acquire(self._handle, strategy, cost, priority, local.ticket_ref)
        except ctypes.ArgumentError:
            raise _not_ints("acquire", cost=cost, priority=priority) from None
        if status:
            _raise(status, "acquire")
        return local.ticket.value

    def acquire_among(self, strategy: int, cost: int, priority: int, pool: Pool) -> int:
        """Like `acquire`, choosing only among the pool's slots."""
        local = self._local
        try:
            status = _fast_acquire_among(
                self._handle, strategy, cost, priority, pool.slots, pool.count, pool.cursor_ref,
                local.ticket_ref,
            )  # fmt: skip
        except ctypes.ArgumentError:
            raise _not_ints("acquire among pool", cost=cost, priority=priority) from None
        if status:
            _raise(status, "acquire among pool")
        return local.ticket.value

    def acquire_affine(
        self, strategy: int, cost: int, priority: int, key: int | None, hashes: Any | None, pool: Pool | None
    ) -> tuple[int, Outcome, int]:
        """Like `acquire` (among `pool` if given) with a session key (u64) or prefix hashes (a
        c_uint64 array): returns (ticket or SLOT_NONE, outcome, matched prefix blocks)."""
        local = self._local
        outcome, matched = ctypes.c_uint32(), ctypes.c_uint32()
        hashes_count = 0 if hashes is None else len(hashes)
        slots, slots_count, cursor = (
            (None, 0, None) if pool is None else (pool.slots, pool.count, pool.cursor_ref)
        )
        key_args = (0, 0) if key is None else (key, 1)
        status = _lib.irm_acquire_affine(
            self._handle, strategy, cost, priority, *key_args, hashes, hashes_count,
            slots, slots_count, cursor, local.ticket_ref, ctypes.byref(outcome), ctypes.byref(matched),
        )  # fmt: skip
        _check(status, "acquire with affinity")
        return local.ticket.value, Outcome(outcome.value), matched.value

    def acquire_priced(
        self,
        strategy: int,
        cost: int,
        priority: int,
        hashes: Any | None,
        pool: Pool | None,
        block_cost_milli: int,
        discount: bool,
    ) -> tuple[int, Outcome, int, int]:
        """Like `acquire_affine` without a key, with a price per prompt block (thousandths of a
        cost unit) and whether cached blocks discount the reservation: returns (ticket or
        SLOT_NONE, outcome, matched prefix blocks, the cost reserved, which the release must
        give back)."""
        local = self._local
        outcome, matched, reserved = ctypes.c_uint32(), ctypes.c_uint32(), ctypes.c_uint32()
        hashes_count = 0 if hashes is None else len(hashes)
        slots, slots_count, cursor = (
            (None, 0, None) if pool is None else (pool.slots, pool.count, pool.cursor_ref)
        )
        status = _lib.irm_acquire_priced(
            self._handle, strategy, cost, priority, hashes, hashes_count, block_cost_milli,
            int(discount), slots, slots_count, cursor, local.ticket_ref, ctypes.byref(outcome),
            ctypes.byref(matched), ctypes.byref(reserved),
        )  # fmt: skip
        _check(status, "acquire priced")
        return local.ticket.value, Outcome(outcome.value), matched.value, reserved.value

    def acquire_on(self, slot: int, cost: int, priority: int) -> int:
        """Reserves `cost` on `slot` (chosen outside the core): the ticket, or SLOT_NONE if it
        cannot take it."""
        local = self._local
        status = _lib.irm_acquire_on(self._handle, slot, cost, priority, local.ticket_ref)
        _check(status, f"acquire on slot {slot}")
        return local.ticket.value

    def acquire_batch(self, strategy: int, priority: int, costs: Any, tickets_out: Any) -> int:
        """Fills `tickets_out` (a c_uint64 array, `ticket_array`) with one decision per entry of
        `costs` (a c_int32 array of the same length): a ticket or SLOT_NONE. Returns how many
        were acquired."""
        count = len(costs)
        if len(tickets_out) < count:
            raise ValueError("tickets_out is shorter than costs")
        out, out_ref = self._out()
        acquired = 0
        for start in _chunks(count):
            chunk = min(BATCH_COUNT_MAX, count - start)
            status = _lib.irm_acquire_batch(
                self._handle,
                strategy,
                priority,
                chunk,
                _part(costs, start, chunk),
                _part(tickets_out, start, chunk),
                out_ref,
            )
            _check(status, "acquire batch")
            acquired += out.value
        return acquired

    def release(self, ticket: int, cost: int, latency_us: int, ok: bool) -> None:
        """Returns the reservation `ticket` names. StaleReleaseError (counters unchanged) if its
        slot was freed and reused since. `latency_us` above 2**31 - 1 is clamped."""
        if latency_us > LATENCY_US_MAX:
            latency_us = LATENCY_US_MAX
        try:
            slot, incarnation = ticket & TICKET_SLOT_MASK, ticket >> 32
            status = _fast_release(self._handle, slot, incarnation, cost, latency_us, 1 if ok else 0)
        except (ctypes.ArgumentError, TypeError):
            raise _not_ints(
                f"release slot {ticket!r}", ticket=ticket, cost=cost, latency_us=latency_us
            ) from None
        if status:
            _raise(status, f"release slot {slot}")

    # ---- request records: the seed API's per-call path ------------------------------------------

    def route_call(self) -> tuple[Callable[[int, int, int, int, int, int], int], int]:
        """The core's `irm_route` and this table's handle: `function(handle, strategy, request_id
        & 0xFFFFFFFF, request_id >> 32, cost, priority)` reserves `cost` and records the request
        (for `complete`), and returns the chosen backend's id (>= 0; for an id of 2**31 or more,
        `ROUTE_SLOT_BASE - slot`), ROUTE_NONE when nothing fits, or `-status` when refused
        (`raise_route_refusal` raises it).

        The seed API's per-call path, so the bare foreign function: no converters and no
        out-parameter, so the caller must pass ints in range (ids in 0..REQUEST_ID_MAX, cost and
        priority as `acquire` takes them); other ints would be truncated to 32 bits, and other
        types raise `CallArgumentError`. After `close` the handle is refused (`-invalid_handle`):
        handles carry a generation, so a closed table's handle names no other table until the
        process has opened some 8 million tables since."""
        return _fast_route, self._handle

    def complete(self, request_id: int, ok: bool, latency_us: int) -> bool:
        """Releases exactly what `route` reserved for `request_id` and forgets it; `latency_us`
        < 0 means "the time since it was routed" (measured in the core). False if no such request
        is in flight here (nothing changed). StaleReleaseError if its backend's slot was reused
        since (the record is gone, the counters unchanged)."""
        if latency_us > LATENCY_US_MAX:
            latency_us = LATENCY_US_MAX
        status = _fast_complete(self._handle, request_id & _LOW, request_id >> 32, 1 if ok else 0, latency_us)
        if status:
            if status == _UNKNOWN_REQUEST:
                return False
            _raise(status, f"complete request {request_id}")
        return True

    def request_ticket(self, request_id: int) -> int | None:
        """The ticket of the reservation `route` recorded for `request_id`, or None if it is not
        in flight here."""
        ticket = ctypes.c_uint64()
        status = _lib.irm_request_read(
            self._handle, request_id & _LOW, request_id >> 32, ctypes.byref(ticket)
        )
        if status == _UNKNOWN_REQUEST:
            return None
        _check(status, f"read request {request_id}")
        return ticket.value

    def requests_count(self) -> int:
        """Requests `route` recorded here and `complete` has not released yet (none once closed:
        closing frees the records)."""
        if not self._handle:
            return 0
        count = ctypes.c_uint64()
        _check(_lib.irm_requests_count(self._handle, ctypes.byref(count)), "count requests")
        return count.value

    def release_batch(self, tickets: Any, costs: Any, latencies_us: Any | None, ok: bool) -> None:
        """Releases a batch (c_uint64 tickets, c_int32 costs, optional c_uint32 latencies);
        tickets equal to SLOT_NONE are skipped, so batch acquire output can be passed back as is."""
        count = len(tickets)
        if len(costs) != count or (latencies_us is not None and len(latencies_us) != count):
            raise ValueError("slots, costs and latencies must have the same length")
        out, out_ref = self._out()
        for start in _chunks(count):
            chunk = min(BATCH_COUNT_MAX, count - start)
            status = _lib.irm_release_batch(
                self._handle, chunk, _part(tickets, start, chunk), _part(costs, start, chunk),
                _part(latencies_us, start, chunk),
                int(ok), out_ref,
            )  # fmt: skip
            _check(status, f"release batch (released {start + out.value} of {count})")

    # ---- owners (a dead worker's reservations given back: zig/owners.zig) -----------------------

    def attach_owner(self, owner: int) -> None:
        """Makes this handle owner `owner` (1..OWNERS_MAX-1) of its shared table, right after
        opening it: its reservations are recorded so that `reclaim_owner` can give them back."""
        if type(owner) is not int or not 1 <= owner < OWNERS_MAX:
            raise _errors.InvalidArgumentError(
                "owner_in_use", f"owner must be an int in 1..{OWNERS_MAX - 1}, got {owner!r}"
            )
        _check(_lib.irm_owner_attach(self._handle, owner), f"attach as owner {owner}")

    def reclaim_owner(self, owner: int) -> tuple[int, int]:
        """Gives back what owner `owner` holds (its process dead, or its handle closed):
        (reservations, cost) given back."""
        return self._owner_call(_lib.irm_owner_reclaim, owner, "reclaim")

    def owner_held(self, owner: int) -> tuple[int, int]:
        """What owner `owner` holds now: (reservations, cost)."""
        return self._owner_call(_lib.irm_owner_held, owner, "read holdings of")

    def _owner_call(self, function: Any, owner: int, verb: str) -> tuple[int, int]:
        if type(owner) is not int or not 1 <= owner < OWNERS_MAX:
            raise _errors.InvalidArgumentError(
                "invalid_argument", f"owner must be an int in 1..{OWNERS_MAX - 1}, got {owner!r}"
            )
        leases, cost = ctypes.c_uint64(), ctypes.c_uint64()
        _check(
            function(self._handle, owner, ctypes.byref(leases), ctypes.byref(cost)), f"{verb} owner {owner}"
        )
        return leases.value, cost.value

    def owner_info(self) -> tuple[int, int]:
        """(owner records of the table: 0 if private, this handle's owner: 0 if unowned)."""
        maximum, owner = ctypes.c_uint32(), ctypes.c_uint32()
        _check(_lib.irm_owner_info(self._handle, ctypes.byref(maximum), ctypes.byref(owner)), "owner info")
        return maximum.value, owner.value

    def release_generation(self) -> int:
        """A number that moves on every release, capacity or state change, and reclaim."""
        generation = ctypes.c_uint64()
        _check(_lib.irm_release_generation(self._handle, ctypes.byref(generation)), "release generation")
        return generation.value

    def wait_release(self, seen: int, timeout_ms: int) -> int:
        """Sleeps until the release generation differs from `seen` or `timeout_ms` (at most
        RELEASE_WAIT_MS_MAX) pass, without the GIL; returns the generation then."""
        generation = ctypes.c_uint64()
        status = _lib.irm_release_wait(self._handle, seen, timeout_ms, ctypes.byref(generation))
        _check(status, "wait for a release")
        return generation.value

    # ---- observation ---------------------------------------------------------------------------

    def read(self, slot: int) -> SlotRecord:
        """One backend's counters (it may be retired, with requests still in flight)."""
        row = SlotRecord()
        _check(_lib.irm_backend_read(self._handle, slot, ctypes.byref(row)), f"read slot {slot}")
        return row

    def snapshot(self) -> list[SlotRecord]:
        """Every backend present or still holding requests in flight, read in one call."""
        _maximum, present = self.info()
        capacity = present + 16
        while True:
            rows = (SlotRecord * capacity)()
            count = ctypes.c_uint32()
            status = _lib.irm_table_snapshot(self._handle, rows, capacity, ctypes.byref(count))
            if status_name(status) == "buffer_too_small":
                capacity = count.value + 16
                continue
            _check(status, "snapshot")
            return rows[: count.value]


class Pool:
    """A subset of a table's slots to choose among (e.g. the backends serving one model), with its
    own round-robin cursor. Immutable: build a new Pool when membership changes."""

    __slots__ = ("count", "cursor", "cursor_ref", "slots")

    def __init__(self, slots: Sequence[int]) -> None:
        self.count = len(slots)
        self.slots = (ctypes.c_uint32 * max(1, self.count))(*slots)
        self.cursor = ctypes.c_uint64(0)
        self.cursor_ref = ctypes.byref(self.cursor)

    def __len__(self) -> int:
        return self.count


def raise_route_refusal(result: int, request_id: object) -> NoReturn:
    """Raises the error for a negative `route_call` result other than ROUTE_NONE: the seed API's
    ValueError (an InvalidArgumentError) for an id already in flight, else the status's error."""
    if -result == _DUPLICATE_REQUEST:
        raise _errors.InvalidArgumentError(
            "duplicate_request", f"request {request_id!r} is already in flight; complete it first"
        )
    _raise(-result, f"route request {request_id!r}")
    raise AssertionError("unreachable: _raise raises")


def prefix_hashes(text: str | bytes, block_bytes: int = 64) -> Any:
    """Chained hashes of `text`'s full blocks (UTF-8 bytes), computed in the core: a c_uint64
    array to pass as `prefix_hashes`. Equal prefixes give equal leading hashes."""
    raw = text.encode() if isinstance(text, str) else bytes(text)
    if type(block_bytes) is not int or block_bytes < 1:
        raise _errors.InvalidArgumentError(
            "invalid_argument", f"block_bytes must be >= 1, got {block_bytes!r}"
        )
    capacity = min(len(raw) // block_bytes, PREFIX_HASHES_MAX)
    hashes = (ctypes.c_uint64 * capacity)()
    count = ctypes.c_uint32()
    status = _lib.irm_prefix_hashes(
        raw, min(len(raw), 2**32 - 1), block_bytes, hashes, capacity, ctypes.byref(count)
    )
    _check(status, "prefix hashes")
    return hashes


def uint64_array(values: Sequence[int]) -> Any:
    """A c_uint64 array of `values` (returned as is if it already is one, e.g. `prefix_hashes`)."""
    if isinstance(values, ctypes.Array) and values._type_ is ctypes.c_uint64:
        return values
    if len(values) > PREFIX_HASHES_MAX:
        values = values[:PREFIX_HASHES_MAX]  # Routing on the first blocks is as good as on all.
    return (ctypes.c_uint64 * len(values))(*values)


def slot_of_ticket(ticket: int) -> int:
    """The slot a ticket's reservation is on."""
    return ticket & TICKET_SLOT_MASK


def ticket_array(values: Sequence[int] | int) -> Any:
    """A c_uint64 array of tickets, or of `values` zeros if it is a length (for batch output)."""
    if isinstance(values, int):
        return (ctypes.c_uint64 * values)()
    return (ctypes.c_uint64 * len(values))(*values)


def uint32_array(values: Sequence[int]) -> Any:
    return (ctypes.c_uint32 * len(values))(*values)


def int32_array(values: Sequence[int]) -> Any:
    return (ctypes.c_int32 * len(values))(*values)


def empty_uint32_array(length: int) -> Any:
    return (ctypes.c_uint32 * length)()


# ---- the seed API's builtins (zig/python.zig) ------------------------------------------------------

_PYTHON_API: Final = (
    "PyTuple_GetItem",
    "PyDict_Size",
    "PyObject_GetAttr",
    "PyObject_Vectorcall",
    "PyLong_AsUnsignedLongLong",
    "PyLong_AsLongLong",
    "PyLong_FromLongLong",
    "PyLong_FromUnsignedLongLong",
    "PyErr_Occurred",
    "PyErr_Clear",
    "Py_IncRef",
    "Py_DecRef",
    "PyTuple_Size",
    "PyObject_Call",
    "PyType_GenericAlloc",
    "PyObject_GC_UnTrack",
    "PyObject_GC_Del",
)
"""The CPython functions zig/python.zig calls, in the order of its `Api` (whose last fields, the
objects `int`, `None` and `_request_fields`, follow them)."""
SEED_STATE: Final = (
    "handle",
    "strategy",
    "in_flight",
    "request_type",
    "route_fallback",
    "complete_fallback",
    "route_refused",
    "complete_refused",
    "router_gone",
    "id_name",
    "cost_name",
    "priority_name",
)
"""The entries of the tuple the builtins are bound to, in order (`Item` in zig/python.zig)."""
_METH_FASTCALL_KEYWORDS: Final = 0x0080 | 0x0002


class _MethodDef(ctypes.Structure):
    """CPython's `PyMethodDef` (its layout is part of the stable ABI)."""

    _fields_ = (
        ("ml_name", ctypes.c_char_p),
        ("ml_meth", ctypes.c_void_p),
        ("ml_flags", ctypes.c_int),
        ("ml_doc", ctypes.c_char_p),
    )


def _has_stable_object_header() -> bool:
    """Whether objects start with the stable ABI's header (reference count, then type), the one
    layout zig/python.zig reads: not so in a free-threaded or trace-refs build."""
    type_offset = ctypes.sizeof(ctypes.c_ssize_t)
    samples: tuple[object, ...] = (7, None, "id", ())
    return all(ctypes.c_void_p.from_address(id(x) + type_offset).value == id(type(x)) for x in samples)


class _TypeSlot(ctypes.Structure):
    """CPython's `PyType_Slot`."""

    _fields_ = (("slot", ctypes.c_int), ("pfunc", ctypes.c_void_p))


class _TypeSpec(ctypes.Structure):
    """CPython's `PyType_Spec`."""

    _fields_ = (
        ("name", ctypes.c_char_p),
        ("basicsize", ctypes.c_int),
        ("itemsize", ctypes.c_int),
        ("flags", ctypes.c_uint),
        ("slots", ctypes.POINTER(_TypeSlot)),
    )


class _MemberDef(ctypes.Structure):
    """CPython's `PyMemberDef`."""

    _fields_ = (
        ("name", ctypes.c_char_p),
        ("type", ctypes.c_int),
        ("offset", ctypes.c_ssize_t),
        ("flags", ctypes.c_int),
        ("doc", ctypes.c_char_p),
    )


# CPython's stable-ABI numbers (typeslots.h, object.h, descrobject.h).
_PY_TP_CLEAR, _PY_TP_DEALLOC, _PY_TP_DOC, _PY_TP_INIT, _PY_TP_NEW, _PY_TP_TRAVERSE, _PY_TP_MEMBERS = (
    51, 52, 56, 60, 65, 71, 72,
)  # fmt: skip
_TPFLAGS_BASETYPE_GC: Final = 1 << 18 | 1 << 10 | 1 << 14  # DEFAULT | BASETYPE | HAVE_GC
_T_OBJECT_EX: Final = 16
_BOUND_COUNT: Final = 11
"""What `irm_python_bind` writes (`bound_count` in zig/python.zig)."""


def _request_fields(id: object, cost: int = 1, priority: int = 0) -> tuple[object, int, int]:
    """A request's fields, checked: the core's request type calls this for every construction
    but positional ints in range, so its errors are these."""
    return id, check_cost(cost), check_priority(priority)


_request_fields.__qualname__ = "Request"  # Its argument errors read "Request() missing ...".


def _bind_python() -> tuple[Any, ...] | None:
    """Binds zig/python.zig to this interpreter: `PyCFunction_NewEx`, the definitions of the two
    builtins and the core's request type; None where that cannot be done (not CPython, or another
    object layout): the router then keeps its Python methods and class."""
    pythonapi = getattr(ctypes, "pythonapi", None)
    if pythonapi is None or not _has_stable_object_header():
        return None
    addresses = [ctypes.cast(getattr(pythonapi, name), ctypes.c_void_p).value or 0 for name in _PYTHON_API]
    addresses += [id(int), id(None), id(_request_fields)]
    bound = (ctypes.c_uint64 * _BOUND_COUNT)()
    functions = (ctypes.c_uint64 * len(addresses))(*addresses)
    _check(_lib.irm_python_bind(functions, len(addresses), bound, _BOUND_COUNT), "bind to Python")
    route_address, complete_address, *request_values = bound
    new_function = pythonapi.PyCFunction_NewEx
    new_function.argtypes = (ctypes.POINTER(_MethodDef), ctypes.py_object, ctypes.py_object)
    new_function.restype = ctypes.py_object
    route = _MethodDef(b"route_request", route_address, _METH_FASTCALL_KEYWORDS, _ROUTE_DOC)
    complete = _MethodDef(b"complete", complete_address, _METH_FASTCALL_KEYWORDS, _COMPLETE_DOC)
    request_base, definitions = _request_base(pythonapi, request_values)
    # Each builtin and the type point at these definitions: kept for the life of the process.
    return new_function, route, complete, request_base, definitions


_ROUTE_DOC: Final = (
    b"route_request($self, request, *, pool=None, affinity_key=None, prefix_hashes=None)\n--\n\n"
    b"Router.route_request, its plain call made in the core (irmiddleware._router)."
)
_COMPLETE_DOC: Final = (
    b"complete($self, request, *, ok=True, latency_s=None)\n--\n\n"
    b"Router.complete, its plain call made in the core (irmiddleware._router)."
)
_REQUEST_DOC: Final = ctypes.c_char_p(
    b"RequestBase(id, cost=1, priority=0)\n--\n\nA request's fields, checked at construction."
)


def _request_base(pythonapi: Any, values: Sequence[int]) -> tuple[type, tuple[object, ...]]:
    """The core's request type (`PyType_FromSpec`) from what `irm_python_bind` gave: its slot
    functions, size and field offsets; and the definitions it points at."""
    *slot_functions, size, id_offset, cost_offset, priority_offset = values
    members = (_MemberDef * 4)(
        _MemberDef(b"id", _T_OBJECT_EX, id_offset, 0, None),
        _MemberDef(b"cost", _T_OBJECT_EX, cost_offset, 0, None),
        _MemberDef(b"priority", _T_OBJECT_EX, priority_offset, 0, None),
    )  # and a zeroed end marker
    slot_numbers = (_PY_TP_NEW, _PY_TP_INIT, _PY_TP_DEALLOC, _PY_TP_TRAVERSE, _PY_TP_CLEAR)
    slots = (_TypeSlot * 8)(
        *(_TypeSlot(number, address) for number, address in zip(slot_numbers, slot_functions, strict=True)),
        _TypeSlot(_PY_TP_MEMBERS, ctypes.addressof(members)),
        _TypeSlot(_PY_TP_DOC, ctypes.cast(_REQUEST_DOC, ctypes.c_void_p).value),
    )  # and a zeroed end marker
    spec = _TypeSpec(b"irmiddleware._native.RequestBase", size, 0, _TPFLAGS_BASETYPE_GC, slots)
    from_spec = pythonapi.PyType_FromSpec
    from_spec.argtypes = (ctypes.POINTER(_TypeSpec),)
    from_spec.restype = ctypes.py_object
    request_base: type = from_spec(ctypes.byref(spec))
    return request_base, (members, slots, spec)


_SEED_BUILTINS = _bind_python()
"""Kept for the life of the process: the builtins and the request type point at its definitions."""


class _PythonRequestBase:
    """The request fields where the core cannot make its type (not CPython)."""

    __slots__ = ("cost", "id", "priority")

    def __init__(self, id: int, cost: int = 1, priority: int = 0) -> None:
        self.id = id
        # The checks inline, with the checkers called only to raise: a seed-API caller builds one
        # Request per decision, so these lines are on its per-call path.
        if type(cost) is not int or not 0 < cost <= COST_MAX:
            check_cost(cost)
        if type(priority) is not int or not 0 <= priority < CLASSES_COUNT:
            check_priority(priority)
        self.cost = cost
        self.priority = priority


if TYPE_CHECKING:
    RequestBase = _PythonRequestBase
else:
    RequestBase = _PythonRequestBase if _SEED_BUILTINS is None else _SEED_BUILTINS[3]
"""`Request`'s base: the core's request type (its construction and field reads on the seed API's
per-call path cost no Python line), a Python class with the same behaviour where it cannot be
made. Its fields: `id` (any hashable), `cost` (an int in 1..COST_MAX) and `priority` (0..7),
checked at construction."""


def seed_builtins(
    handle: int,
    strategy: int,
    in_flight: dict[object, Any],
    request_type: type,
    route_fallback: Callable[[], Callable[..., Any] | None],
    complete_fallback: Callable[[], Callable[..., Any] | None],
) -> tuple[Callable[..., int | None], Callable[..., None]] | None:
    """The seed API's per-call pair as two builtin functions made in the core (zig/python.zig):
    `route(request)` routes a request whose id (0..REQUEST_ID_MAX), cost and priority are ints in
    range with one `irm_route`, and `complete(request_or_id)` completes one the core recorded with
    one `irm_complete`; every other call goes to `route_fallback()`/`complete_fallback()`
    (`weakref.WeakMethod`s of the router's Python methods), and so does `route` while `in_flight`
    (the router's own records) is not empty. Refusals raise as `raise_route_refusal` and
    `raise_complete_refusal` do. None where builtins cannot be made (not CPython).

    They hold the GIL throughout, like the `ctypes.PyDLL` calls of `route_call`. They keep `handle`:
    after `close` they are refused (`invalid_handle`), as `route_call`'s function is."""
    if _SEED_BUILTINS is None:
        return None
    new_function, route_definition, complete_definition, request_base, _definitions = _SEED_BUILTINS
    # The builtins read the fields of exactly `request_type` at the core's offsets.
    if not issubclass(request_type, request_base) or request_type.__basicsize__ != request_base.__basicsize__:
        return None
    entries = {
        "handle": handle,
        "strategy": strategy,
        "in_flight": in_flight,
        "request_type": request_type,
        "route_fallback": route_fallback,
        "complete_fallback": complete_fallback,
        "route_refused": raise_route_refusal,
        "complete_refused": raise_complete_refusal,
        "router_gone": _raise_router_gone,
        "id_name": "id",
        "cost_name": "cost",
        "priority_name": "priority",
    }
    state = tuple(entries[name] for name in SEED_STATE)
    route = new_function(ctypes.byref(route_definition), state, __name__)
    complete = new_function(ctypes.byref(complete_definition), state, __name__)
    return route, complete


def raise_complete_refusal(status: int, request_id: object) -> NoReturn:
    """Raises the error for an `irm_complete` status other than ok and unknown_request."""
    _raise(status, f"complete request {request_id}")
    raise AssertionError("unreachable: _raise raises")


def _raise_router_gone() -> NoReturn:
    raise _errors.InvalidHandleError(
        "invalid_handle", "the router of this route_request/complete was garbage-collected"
    )
