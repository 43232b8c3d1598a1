"""irmiddleware: intelligent request routing for inference servers.

The routing core is a Zig library (atomic per-backend counters, strategies in O(1) or O(log n));
this package wraps it in the seed's Python API (`Accelerator`, `Request`, `Router`) and, on top,
an ASGI proxy for vLLM, Triton and TGI fleets.
"""

from irmiddleware._errors import (
    BusyError,
    DuplicateBackendError,
    InvalidArgumentError,
    InvalidHandleError,
    IrmError,
    NativeError,
    NativeLibraryError,
    ReleaseMismatchError,
    SharedMemoryError,
    StaleReleaseError,
    TableFullError,
    UnknownBackendError,
)
from irmiddleware._native import unlink_shared
from irmiddleware._router import (
    STRATEGIES,
    Accelerator,
    AcceleratorStats,
    Lease,
    Request,
    Router,
    prefix_hashes,
)

__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "Accelerator",
    "AcceleratorStats",
    "BusyError",
    "DuplicateBackendError",
    "InvalidArgumentError",
    "InvalidHandleError",
    "IrmError",
    "Lease",
    "NativeError",
    "NativeLibraryError",
    "ReleaseMismatchError",
    "Request",
    "Router",
    "SharedMemoryError",
    "StaleReleaseError",
    "TableFullError",
    "UnknownBackendError",
    "__version__",
    "prefix_hashes",
    "unlink_shared",
]
