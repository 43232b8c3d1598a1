"""The router's configuration: TOML (DESIGN.md's shape) read with `tomllib` into frozen dataclasses.

Every value is checked here, once, and an error names the key (`backends[1].capacity`), so a bad
file fails at startup with a message an operator can act on.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from irmiddleware.proxy._admission_config import AdmissionConfig, parse_admission

__all__ = [
    "BackendConfig",
    "ConfigError",
    "HealthConfig",
    "LimitsConfig",
    "OutliersConfig",
    "RetriesConfig",
    "RouterConfig",
    "SignalsConfig",
    "TimeoutsConfig",
    "check_listen",
    "load_config",
    "parse_config",
]


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    """`[router.timeouts]`, seconds. `read_s` bounds the wait for each chunk (a token stream's gap
    between tokens, or a non-streaming answer's whole generation), so it is long by default."""

    connect_s: float = 5.0
    read_s: float = 600.0
    write_s: float = 60.0
    pool_s: float = 10.0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """`[router.limits]`: request body size and upstream connection pool bounds."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_connections: int = 1024
    max_keepalive_connections: int = 256


@dataclass(frozen=True, slots=True)
class RetriesConfig:
    """`[router.retries]`: extra attempts on another backend after a connection failure (before
    any byte reached the client; never after)."""

    connect_attempts: int = 2


def _bounded(default: Any, low: float, high: float | None = None) -> Any:
    # The bounds live with the field so the section parser can check every key the same way.
    return field(default=default, metadata={"low": low, "high": high})


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """`[router.health]`: active checks (each adapter's health endpoint, or a plugin's probe)."""

    enabled: bool = True
    interval_s: float = _bounded(5.0, 0.01)
    timeout_s: float = _bounded(2.0, 0.001)
    healthy_threshold: int = _bounded(2, 1)
    """Consecutive passing checks that bring a backend marked unhealthy back."""
    unhealthy_threshold: int = _bounded(3, 1)
    """Consecutive failing checks (refused, timeout, bad status) that take a backend out."""
    require_ready: bool = False
    """True: a backend gets no traffic before its first passing check (slow starters)."""


@dataclass(frozen=True, slots=True)
class OutliersConfig:
    """`[router.outliers]`: passive ejection from live traffic."""

    enabled: bool = True
    consecutive_connect_failures: int = _bounded(2, 1)
    consecutive_errors: int = _bounded(5, 1)
    """Consecutive 5xx, broken answers, timeouts or overload answers."""
    base_ejection_s: float = _bounded(5.0, 0.001)
    """First cool-down; each repeat offence doubles it, up to `max_ejection_s`."""
    max_ejection_s: float = _bounded(300.0, 0.001)
    overload_penalty_s: float = _bounded(0.5, 0.0)
    """A backend answering an overload status is skipped this long (0 = never)."""
    min_eligible_share: float = _bounded(0.5, 0.0, 1.0)
    """Ejections never leave fewer than this share of a pool's backends eligible (panic
    threshold: beyond it the pool's healthy backends are all routed to, ejected or not)."""


@dataclass(frozen=True, slots=True)
class SignalsConfig:
    """`[router.signals]`: scraping the load backends report (their Prometheus endpoints)."""

    enabled: bool = True
    interval_s: float = _bounded(1.0, 0.01)
    timeout_s: float = _bounded(1.0, 0.001)
    max_age_s: float = _bounded(5.0, 0.01)
    """Signals not refreshed by a successful scrape within this age are ignored by the core."""


@dataclass(frozen=True, slots=True)
class AffinityConfig:
    """`[router.affinity]`: what the cache-aware strategies (consistent_hash, prefix_affinity)
    read from a request."""

    session_header: str = "x-session-id"
    """The header carrying a session key (consistent_hash); else the body's OpenAI `user` field."""
    prefix_block_chars: int = _bounded(64, 1)
    """Characters per prompt block hashed for prefix_affinity (64 ≈ vLLM's 16-token blocks)."""
    balance_epsilon: float = _bounded(0.25, 0.0, 10.0)
    """Bounded load: a backend may exceed its share of the fleet's load by this fraction before
    affinity yields to load."""


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One `[[backends]]` entry."""

    url: str
    type: str = "vllm"
    capacity: int = 64
    models: tuple[str, ...] = ()
    """Empty = discover from the backend (the adapter's models path) at startup."""
    weight: float = 1.0
    metrics_url: str | None = None
    """Where to scrape load signals; default: the adapter's (Triton: port 8002 of the host)."""


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """The whole configuration: `[router]` plus its tables, and `[[backends]]`."""

    backends: tuple[BackendConfig, ...]
    strategy: str = "p2c"
    listen: str = "127.0.0.1:8000"
    retry_after_s: int = 1
    """`Retry-After` on 503 answers when nothing fits."""
    metrics_path: str = "/metrics"
    status_path: str = "/irm/status"
    transport: str = "lean"
    """Upstream HTTP/1.1 transport under the httpx client: `lean` (ours, `http://` backends) or
    `httpx` (httpcore for everything)."""
    shutdown_grace_s: int | None = None
    """`irmiddleware serve` on SIGTERM/SIGINT: stop accepting, then let requests in flight finish
    for at most this many seconds before cutting them (their load is released, outcome `cancelled`).
    None (the default) waits for every one, so nothing in flight is lost."""
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    retries: RetriesConfig = field(default_factory=RetriesConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    outliers: OutliersConfig = field(default_factory=OutliersConfig)
    signals: SignalsConfig = field(default_factory=SignalsConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    """`[admission]`: priority classes, bounded waiting, tenant limits (doc/admission.md)."""

    @property
    def listen_host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


def load_config(path: str | Path) -> RouterConfig:
    """Reads and validates a TOML file; ConfigError names the file and the key."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{path}: {error}") from None
    try:
        return parse_config(data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def parse_config(data: Mapping[str, Any]) -> RouterConfig:
    """Validates an already-parsed document (a dict shaped like the TOML file)."""
    _no_unknown_keys(data, {"router", "backends", "admission"}, "")
    router = _table(data, "router", "")
    _no_unknown_keys(router, _field_names(RouterConfig) - {"backends"}, "router.")
    backends = data.get("backends")
    if not isinstance(backends, list) or not backends:
        raise ConfigError("`backends` must be a non-empty array of tables ([[backends]])")

    def value(key: str, kind: type, low: float | None = None) -> Any:
        return _get(router, key, kind, "router.", _default(RouterConfig, key), low=low)

    config = RouterConfig(
        backends=tuple(_backend(entry, f"backends[{index}]") for index, entry in enumerate(backends)),
        strategy=value("strategy", str),
        listen=check_listen(value("listen", str)),
        retry_after_s=value("retry_after_s", int, low=0),
        metrics_path=_path(value("metrics_path", str), "metrics_path"),
        status_path=_path(value("status_path", str), "status_path"),
        transport=_one_of(value("transport", str), "transport", ("lean", "httpx")),
        shutdown_grace_s=_optional_seconds(router, "shutdown_grace_s"),
        timeouts=_section(router, "timeouts", TimeoutsConfig, float),
        limits=_section(router, "limits", LimitsConfig, int),
        retries=_section(router, "retries", RetriesConfig, int),
        health=_typed_section(router, "health", HealthConfig),
        outliers=_typed_section(router, "outliers", OutliersConfig),
        signals=_typed_section(router, "signals", SignalsConfig),
        affinity=_typed_section(router, "affinity", AffinityConfig),
        admission=parse_admission(_table(data, "admission", "")),
    )
    _no_duplicate_urls(config.backends)
    return config


def _backend(entry: object, where: str) -> BackendConfig:
    if not isinstance(entry, dict):
        raise ConfigError(f"`{where}` must be a table")
    _no_unknown_keys(entry, _field_names(BackendConfig), f"{where}.")
    if "url" not in entry:
        raise ConfigError(f"`{where}.url` is required")
    models = entry.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise ConfigError(f"`{where}.models` must be an array of non-empty strings")
    return BackendConfig(
        url=_url(entry["url"], f"{where}.url"),
        type=_get(entry, "type", str, f"{where}.", _default(BackendConfig, "type")),
        capacity=_get(entry, "capacity", int, f"{where}.", _default(BackendConfig, "capacity"), low=1),
        models=tuple(dict.fromkeys(models)),
        weight=_get(entry, "weight", float, f"{where}.", _default(BackendConfig, "weight"), low=0.001),
        metrics_url=_url(entry["metrics_url"], f"{where}.metrics_url") if "metrics_url" in entry else None,
    )


def _section(router: Mapping[str, Any], name: str, cls: type[Any], kind: type) -> Any:
    table = _table(router, name, "router.")
    _no_unknown_keys(table, _field_names(cls), f"router.{name}.")
    defaults = cls()
    low = 0 if name == "retries" else (0.001 if kind is float else 1)
    values = {
        key: _get(table, key, kind, f"router.{name}.", getattr(defaults, key), low=low) for key in table
    }
    return dataclasses.replace(defaults, **values)


def _typed_section(router: Mapping[str, Any], name: str, cls: type[Any]) -> Any:
    # Each key takes the type of its default and the bounds in its field's metadata.
    table = _table(router, name, "router.")
    _no_unknown_keys(table, _field_names(cls), f"router.{name}.")
    values = {}
    for spec in dataclasses.fields(cls):
        if spec.name in table:
            where = f"router.{name}."
            value = _get(table, spec.name, type(spec.default), where, spec.default, spec.metadata.get("low"))
            high = spec.metadata.get("high")
            if high is not None and value > high:
                raise ConfigError(f"`{where}{spec.name}` must be <= {high}, got {value!r}")
            values[spec.name] = value
    return cls(**values)


def _get(
    table: Mapping[str, Any], key: str, kind: type, prefix: str, default: Any, low: float | None = None
) -> Any:
    value: Any = table.get(key, default)
    # bool is an int in Python; a `true` where a number belongs is a mistake, not 1.
    is_number = kind in (int, float) and not isinstance(value, bool)
    if kind is float and is_number and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind) or (kind in (int, float) and not is_number):
        raise ConfigError(f"`{prefix}{key}` must be {kind.__name__}, got {value!r}")
    if low is not None and typing.cast(float, value) < low:
        raise ConfigError(f"`{prefix}{key}` must be >= {low}, got {value!r}")
    return value


def _optional_seconds(router: Mapping[str, Any], key: str) -> int | None:
    # Whole seconds: uvicorn's graceful-shutdown timeout is an int.
    if key not in router:
        return None
    seconds: int = _get(router, key, int, "router.", None, low=0)
    return seconds


def _table(data: Mapping[str, Any], key: str, prefix: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"`{prefix}{key}` must be a table")
    return value


def _no_unknown_keys(table: Mapping[str, Any], known: set[str], prefix: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"unknown key `{prefix}{unknown[0]}`; valid keys: {', '.join(sorted(known))}")


def _default(cls: type[Any], name: str) -> Any:
    # Slotted dataclasses keep defaults only in their fields, not as class attributes.
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _field_names(cls: type[Any]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _url(value: object, where: str) -> str:
    parsed = urllib.parse.urlsplit(value) if isinstance(value, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"`{where}` must be an http(s) URL like http://127.0.0.1:9001, got {value!r}")
    if parsed.query or parsed.fragment:
        raise ConfigError(f"`{where}` must not have a query or fragment, got {value!r}")
    return str(value).rstrip("/")


def check_listen(value: str) -> str:
    """`value` if it is HOST:PORT; ConfigError otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"`router.listen` must be HOST:PORT, got {value!r}")
    return value


def _one_of(value: str, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"`router.{key}` must be one of {', '.join(choices)}, got {value!r}")
    return value


def _path(value: str, key: str) -> str:
    if not value.startswith("/"):
        raise ConfigError(f"`router.{key}` must start with '/', got {value!r}")
    return value


def _no_duplicate_urls(backends: Sequence[BackendConfig]) -> None:
    seen: set[str] = set()
    for index, backend in enumerate(backends):
        if backend.url in seen:
            raise ConfigError(f"`backends[{index}].url` {backend.url!r} is listed twice")
        seen.add(backend.url)
