"""Shared fixtures. Every test that ends with an idle router checks that in-flight counters are
zero (the one accounting invariant, doc/architecture.md) with `irmiddleware.testing.assert_idle`.
The session reads the system's CA certificates lazily and picks the Hypothesis profile
(`pytest_configure`)."""

from __future__ import annotations

import contextlib
import os
import ssl
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import settings

from irmiddleware import unlink_shared
from irmiddleware._errors import SharedMemoryError

# Property tests that set no `max_examples` draw their profile's: hypothesis's default 100 in the
# fast lane (`-m "not slow"`), 300 in the whole suite (CI), more with `--hypothesis-profile
# thorough` (or $HYPOTHESIS_PROFILE=thorough). A test whose examples are costly sets its own number.
settings.register_profile("fast", max_examples=100, deadline=None)
settings.register_profile("full", max_examples=300, deadline=None)
settings.register_profile("thorough", max_examples=3_000, deadline=None)


def pytest_configure(config: pytest.Config) -> None:
    _pick_hypothesis_profile(config)
    _read_ca_certificates_lazily()


def _pick_hypothesis_profile(config: pytest.Config) -> None:
    if config.getoption("--hypothesis-profile", None):
        return  # Hypothesis's own plugin loads the profile named on the command line.
    fast_lane = (config.getoption("markexpr", "") or "").replace(" ", "") == "notslow"
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("fast" if fast_lane else "full"))


def _read_ca_certificates_lazily() -> None:
    """Every httpx client (each `httpx.get`, each `openai` client, each router's upstream and health
    clients) builds an SSL context, and from a CA bundle file (certifi's, or $SSL_CERT_FILE) that
    means parsing ~150 certificates: ~25 ms of CPU per client, half the CPU of the proxy and emulator
    tests, though they all speak plain HTTP to 127.0.0.1. Given $SSL_CERT_DIR and no $SSL_CERT_FILE,
    httpx builds its context from the CA directory (its documented environment variables), which
    OpenSSL reads lazily, at a TLS handshake: TLS would still be verified, against the system's CAs."""
    ca_directory = ssl.get_default_verify_paths().capath  # None when the system has no such directory
    if ca_directory is not None:
        os.environ.pop("SSL_CERT_FILE", None)
        os.environ["SSL_CERT_DIR"] = ca_directory


@pytest.fixture
def shared_name() -> Iterator[str]:
    """A unique /dev/shm name, unlinked after the test whatever happened."""
    name = f"irm-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    yield name
    with contextlib.suppress(SharedMemoryError):  # The test may have unlinked it already.
        unlink_shared(name)
