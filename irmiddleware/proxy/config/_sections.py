"""The `[router.*]` sections: one frozen dataclass each, every field with its default and, where a
value has limits, its bounds (`bounded`). `_toml.section` reads each of them the same way."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from irmiddleware._native import OWNERS_MAX
from irmiddleware.proxy.config._toml import ConfigError, bounded

__all__ = [
    "WORKERS_MAX",
    "AdminConfig",
    "AffinityConfig",
    "HealthConfig",
    "LimitsConfig",
    "OutliersConfig",
    "ProbesConfig",
    "RetriesConfig",
    "SignalsConfig",
    "SpeedConfig",
    "TimeoutsConfig",
    "TokensConfig",
    "check_workers",
]

WORKERS_MAX: Final = OWNERS_MAX - 1
"""Worker processes of one router: the core records reservations for 63 owners per table."""
# A shared table's name as the core accepts it, with room for the tenants table's suffix.
_TABLE_NAME: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,190}")


def check_workers(workers: int, shared_table: str) -> str:
    """`shared_table` if it and `workers` (`[router]`) go together; ConfigError otherwise. With
    several workers the supervisor names the table itself (one per run)."""
    if shared_table and not _TABLE_NAME.fullmatch(shared_table):
        raise ConfigError(
            "`router.shared_table` must be 1-191 letters, digits, '.', '_' or '-' "
            f"(not starting with '.'), got {shared_table!r}"
        )
    if workers > 1 and shared_table:
        raise ConfigError(
            "give `router.workers` or `router.shared_table`, not both: the supervisor of the workers "
            "names its table"
        )
    return shared_table


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    """`[router.timeouts]`, seconds. `read_s` bounds the wait for each chunk (a token stream's gap
    between tokens, or a non-streaming answer's whole generation), so it is long by default. The
    `client_*` keys bound the client's side (applied by `irmiddleware serve`)."""

    connect_s: float = bounded(5.0, 0.001)
    read_s: float = bounded(600.0, 0.001)
    write_s: float = bounded(60.0, 0.001)
    pool_s: float = bounded(10.0, 0.001)
    client_head_s: float = bounded(10.0, 0.001)
    """A client's request head (request line and headers) must arrive within this long of its
    first byte, else 408 and the connection is closed (slowloris)."""
    client_body_s: float = bounded(60.0, 0.001)
    """A request body must arrive within this long of the end of its head, else 408 (or the
    connection is closed, if an answer has begun)."""
    client_idle_s: float = bounded(75.0, 0.001)
    """An idle client connection (no request under way) is closed after this long. Longer than
    the usual client-pool and load-balancer idle timeouts, so they close it first and never
    reuse a connection the router is closing."""
    abort_grace_s: float = bounded(0.5, 0.0, 60.0)
    """After the router gives up on an answer the backend is still producing (client gone, timeout,
    overload answer, broken stream), the backend's slot stays reserved this long after the upstream
    connection is closed, so the backend can notice and stop before the router sends it another
    request (0 = free the slot at once)."""


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """`[router.limits]`: request body size, upstream connection pool bounds, and the bounds on
    what clients send before the router reads a body (head size, header count, connections)."""

    max_body_bytes: int = bounded(16 * 1024 * 1024, 1)
    max_connections: int = bounded(1024, 1)
    max_keepalive_connections: int = bounded(256, 1)
    max_head_bytes: int = bounded(64 * 1024, 1024)
    """A client's request line and headers together; larger heads get 431, counted as the bytes
    arrive (before they are buffered)."""
    max_headers: int = bounded(100, 1)
    """Header fields in one request; more get 431."""
    max_client_connections: int = bounded(4096, 1)
    """Client connections open at once; a connection beyond them gets 503 and is closed."""
    keepalive_expiry_s: float = bounded(4.0, 0.0)
    """Idle upstream connections (proxy, health checks, signal scrapes) are closed after this
    long: below the backends' own idle timeout (uvicorn's 5 s), so the router never sends a
    request on a connection the backend is closing at that moment."""


@dataclass(frozen=True, slots=True)
class RetriesConfig:
    """`[router.retries]`: extra attempts on another backend after a connection failure (before
    any byte reached the client; never after)."""

    connect_attempts: int = bounded(2, 0)


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """`[router.health]`: active checks (each adapter's health endpoint, or a plugin's probe)."""

    enabled: bool = True
    interval_s: float = bounded(5.0, 0.01)
    timeout_s: float = bounded(2.0, 0.001)
    healthy_threshold: int = bounded(2, 1)
    """Consecutive passing checks that bring a backend marked unhealthy back."""
    unhealthy_threshold: int = bounded(3, 1)
    """Consecutive failing checks (refused, timeout, bad status) that take a backend out."""
    require_ready: bool = False
    """True: a backend gets no traffic before its first passing check (slow starters)."""


@dataclass(frozen=True, slots=True)
class OutliersConfig:
    """`[router.outliers]`: passive ejection from live traffic."""

    enabled: bool = True
    consecutive_connect_failures: int = bounded(2, 1)
    consecutive_errors: int = bounded(5, 1)
    """Consecutive 5xx, broken answers, timeouts or overload answers."""
    base_ejection_s: float = bounded(5.0, 0.001)
    """First cool-down; each repeat offence doubles it, up to `max_ejection_s`."""
    max_ejection_s: float = bounded(300.0, 0.001)
    overload_penalty_s: float = bounded(0.5, 0.0)
    """A backend answering an overload status is skipped this long (0 = never)."""
    min_eligible_share: float = bounded(0.5, 0.0, 1.0)
    """Ejections never leave fewer than this share of a pool's backends eligible (panic
    threshold: beyond it the pool's healthy backends are all routed to, ejected or not)."""


@dataclass(frozen=True, slots=True)
class SignalsConfig:
    """`[router.signals]`: scraping the load backends report (their Prometheus endpoints)."""

    enabled: bool = True
    interval_s: float = bounded(1.0, 0.01)
    timeout_s: float = bounded(1.0, 0.001)
    max_age_s: float = bounded(5.0, 0.01, 86_400.0)  # the core keeps it in 32-bit milliseconds
    """Signals not refreshed by a successful scrape within this age are ignored by the core."""


@dataclass(frozen=True, slots=True)
class AffinityConfig:
    """`[router.affinity]`: what the cache-aware strategies (consistent_hash, prefix_affinity)
    read from a request."""

    session_header: str = "x-session-id"
    """The header carrying a session key (consistent_hash); else the body's OpenAI `user` field."""
    prefix_block_chars: int = bounded(64, 1)
    """Characters per prompt block hashed for prefix_affinity (64 ≈ vLLM's 16-token blocks)."""
    balance_epsilon: float = bounded(0.25, 0.0, 10.0)
    """Bounded load: a backend may exceed its share of the fleet's load by this fraction before
    affinity yields to load."""


@dataclass(frozen=True, slots=True)
class SpeedConfig:
    """`[router.speed]`: learning each backend's prefill and decode speed from its answers and
    feeding it to the core as weight (doc/strategies.md, "Learned speed"). `least_ttft` turns it
    on whatever `enabled` says."""

    enabled: bool = False
    """True: the core's weight of a backend is its configured weight * its learned speed over the
    fleet's median, refreshed every `interval_s`."""
    interval_s: float = bounded(1.0, 0.01, 3600.0)
    half_life_s: float = bounded(2.0, 0.001, 3600.0)
    """An observation this long after the previous one of the same backend has weight ½ (within
    `alpha_min` … `alpha_max`)."""
    alpha_min: float = bounded(0.1, 0.001, 1.0)
    alpha_max: float = bounded(0.5, 0.001, 1.0)
    clip: float = bounded(2.5, 0.1, 100.0)
    """A single observation moves an estimate by at most this many mean absolute deviations."""
    stale_s: float = bounded(60.0, 0.01)
    """An estimate not refreshed for this long counts as unknown (relative speed 1)."""


@dataclass(frozen=True, slots=True)
class TokensConfig:
    """`[router.tokens]`: how a request's cost is counted with `[router] cost = "tokens"` (and how
    learned speed sizes a prompt): its uncached prompt tokens plus its expected output tokens, and
    a backend's capacity in the same unit."""

    per_slot: int = bounded(2048, 1, 1 << 20)
    """Tokens one unit of a backend's `capacity` holds: its capacity in tokens is `capacity` *
    `per_slot`. A request never costs more than this (a longer one is counted as this much)."""
    output_default: int = bounded(256, 1, 1 << 20)
    """Expected output tokens of a request without `max_tokens`, until learned speed (when on) has
    seen streamed answers (then: their average length)."""
    chars_per_token: float = bounded(4.0, 0.1, 100.0)
    """Prompt characters per token, for a prompt's size in tokens."""


@dataclass(frozen=True, slots=True)
class ProbesConfig:
    """`[router.probes]`: the liveness and readiness probes the router answers itself on the
    traffic port (never proxied)."""

    enabled: bool = True
    """False: both paths go to the wrapped app (drop-in use, when the app has its own)."""
    health_path: str = "/health"
    """Liveness: 200 while the process serves."""
    ready_path: str = "/ready"
    """Readiness: 200 while the router can serve (`ready`), 503 otherwise and from the start of a
    graceful shutdown."""
    ready: str = "every_model"
    """`every_model`: every model the fleet serves has an active backend; `any_backend`: some
    backend is active."""
    shutdown_delay_s: float = bounded(0.0, 0.0, 3600.0)
    """`irmiddleware serve` on SIGTERM/SIGINT: readiness answers 503 at once, and the router keeps
    accepting and serving this long before its graceful shutdown starts, so a load balancer that
    polls readiness stops sending first (0: the shutdown starts at once)."""


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """`[admin]`: the admin listener of `irmiddleware serve` (metrics, status and the admin API on a
    port of their own) and the bearer token its mutating calls require."""

    listen: str = ""
    """HOST:PORT of the admin listener; "" (the default) = none: metrics and status stay on the
    traffic port and the admin API is not served."""
    token_file: str = ""
    """A file holding the bearer token (surrounding whitespace ignored), read at each call, so a
    rotated file takes effect at once."""
    token_env: str = ""
    """The environment variable holding the bearer token (instead of `token_file`)."""
    protect_reads: bool = False
    """True: reads (backend list, status, metrics) need the token too."""
