"""Pins the public surface: a change to `__all__` must be deliberate (and documented)."""

import irmiddleware


def test_public_names_are_pinned() -> None:
    assert irmiddleware.__all__ == [
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
        "TableFullError",
        "UnknownBackendError",
        "__version__",
        "prefix_hashes",
        "unlink_shared",
    ]
    for name in irmiddleware.__all__:
        assert hasattr(irmiddleware, name), name
