"""The router's httpx clients share one TLS context per process, and it verifies: certificates
required, host names checked, against a loaded CA store (httpx's defaults, which each client used
to build for itself, parsing the CA bundle each time a router started)."""

from __future__ import annotations

import asyncio
import ssl

from proxy_support import config_for

from irmiddleware.proxy._tls import tls_context
from irmiddleware.proxy._upstream import create_client


def test_one_verifying_context_per_process() -> None:
    context = tls_context()
    assert context is tls_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] > 0


async def _client_context() -> ssl.SSLContext:
    async with create_client(config_for(["http://127.0.0.1:1"])) as client:
        pool = client._transport._pool  # type: ignore[attr-defined]  # httpx's, no public accessor
        context: ssl.SSLContext = pool._ssl_context
        return context


def test_the_upstream_client_uses_it() -> None:
    assert asyncio.run(_client_context()) is tls_context()
