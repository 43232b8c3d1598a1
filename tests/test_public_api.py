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
        "StaleReleaseError",
        "TableFullError",
        "UnknownBackendError",
        "__version__",
        "prefix_hashes",
        "unlink_shared",
    ]
    for name in irmiddleware.__all__:
        assert hasattr(irmiddleware, name), name


def test_adapter_and_transport_packages_are_pinned() -> None:
    import irmiddleware.adapters
    import irmiddleware.http11

    adapters = ["OpenAIAdapter", "TGIAdapter", "TritonAdapter", "VLLMAdapter", "prompt_text"]
    assert irmiddleware.adapters.__all__ == adapters
    assert irmiddleware.http11.__all__ == [
        "KEEPALIVE_EXPIRY_S",
        "LeanTransport",
        "PoolStats",
        "ResetAfterWrite",
        "StreamedResponse",
    ]
    for module in (irmiddleware.adapters, irmiddleware.http11):
        for name in module.__all__:
            assert hasattr(module, name), name
