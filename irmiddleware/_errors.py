"""The exceptions irmiddleware raises. Native statuses map onto these in `_native.py`; nobody else
sees a raw status code."""

from __future__ import annotations


class IrmError(Exception):
    """Base class of every error raised by irmiddleware."""


class NativeError(IrmError):
    """The native core refused a call; `status` is the core's status name."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


class InvalidArgumentError(NativeError, ValueError):
    """An argument was out of range (cost, capacity, weight, priority, state, name, ...)."""


class UnknownBackendError(NativeError, LookupError):
    """No backend with that id (or slot) is in the table."""


class DuplicateBackendError(NativeError, ValueError):
    """A backend with that id is already in the table."""


class TableFullError(NativeError):
    """The table has no free slot; create it with a larger `max_accelerators`."""


class ReleaseMismatchError(NativeError):
    """A release returned more than was reserved: a request was released twice or with the wrong
    cost. The counters were left unchanged."""


class StaleReleaseError(ReleaseMismatchError):
    """A release named a reservation whose accelerator was removed and whose slot was reused
    since: refused, so it never lands on the new accelerator. The counters were left unchanged."""


class BusyError(NativeError):
    """The core gave up after a bounded number of retries under contention (or a stuck lock)."""


class SharedMemoryError(NativeError, OSError):
    """A shared-memory table could not be created, found or mapped."""


class InvalidHandleError(NativeError):
    """The table was closed (or never opened in this process)."""


class NativeLibraryError(IrmError, ImportError):
    """The native library is missing, unloadable, or of another ABI version."""
