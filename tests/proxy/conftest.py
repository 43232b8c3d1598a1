"""Fixtures for the proxy tests (defined in proxy_support, which test files also import helpers from)."""

from proxy_support import emulators, router

__all__ = ["emulators", "router"]
