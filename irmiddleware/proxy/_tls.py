"""The TLS context the router's httpx clients share, one per process.

An httpx client builds its TLS context when it is made, and httpx's default context parses the
whole CA bundle: ~150 certificates, ~20 ms of CPU, even for a fleet reached over plain HTTP. A
router makes two clients each time it starts (the proxy's upstream client and the health
checker's), so the two parses were most of a router's start. They share this one instead, built on
first use exactly as those clients built theirs (httpx's defaults with `trust_env=False`: certifi's
CAs, verification on, no environment variable consulted). No client changes it: httpcore sets the
same ALPN list (HTTP/1.1) on it at each TLS connect.
"""

from __future__ import annotations

import functools
import ssl

import httpx

__all__ = ["tls_context"]


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The process's verifying TLS context for the router's clients (built once)."""
    return httpx.create_ssl_context(trust_env=False)
