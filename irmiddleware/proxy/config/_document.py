"""The whole configuration document: `[router]` with its sections, `[[backends]]` and `[admission]`,
read from TOML with `tomllib` into frozen dataclasses (the shape doc/proxy.md documents)."""

from __future__ import annotations

import tomllib
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from irmiddleware._native import CAPACITY_MAX, WEIGHT_MILLI_MAX
from irmiddleware.proxy.config._admission import AdmissionConfig, parse_admission
from irmiddleware.proxy.config._discovery import DiscoveryConfig, parse_discovery
from irmiddleware.proxy.config._sections import (
    WORKERS_MAX,
    AdminConfig,
    AffinityConfig,
    HealthConfig,
    LimitsConfig,
    OutliersConfig,
    ProbesConfig,
    RetriesConfig,
    SignalsConfig,
    SpeedConfig,
    TimeoutsConfig,
    TokensConfig,
    check_workers,
)
from irmiddleware.proxy.config._toml import (
    ConfigError,
    array_entry,
    bounded,
    field_names,
    get,
    no_unknown_keys,
    read,
    section,
    strings,
    table,
)

__all__ = [
    "COSTS",
    "LOG_FORMATS",
    "READY_RULES",
    "BackendConfig",
    "RouterConfig",
    "check_listen",
    "load_config",
    "parse_backend",
    "parse_config",
]

LOG_FORMATS: Final = ("text", "json")
READY_RULES: Final = ("every_model", "any_backend")
COSTS: Final = ("requests", "tokens")
# A bound on `[[backends]] batch_slots` far above any engine's batch (vLLM's default is 256).
BATCH_SLOTS_MAX: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One `[[backends]]` entry."""

    url: str
    type: str = "vllm"
    capacity: int = bounded(64, 1, CAPACITY_MAX)
    models: tuple[str, ...] = ()
    """Empty = discover from the backend (the adapter's models path) at startup."""
    weight: float = bounded(1.0, 0.001, WEIGHT_MILLI_MAX / 1000)
    metrics_url: str | None = None
    """Where to scrape load signals; default: the adapter's (Triton: port 8002 of the host)."""
    batch_slots: int = bounded(0, 0, BATCH_SLOTS_MAX)
    """Requests the engine runs at once (vLLM's `max_num_seqs`); 0 (the default) = not known.
    `least_ttft` counts only the requests beyond them as a queue (doc/strategies.md)."""


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """The whole configuration: `[router]` plus its tables, and `[[backends]]`."""

    backends: tuple[BackendConfig, ...]
    strategy: str = "p2c"
    listen: str = "127.0.0.1:8000"
    retry_after_s: int = bounded(1, 0)
    """`Retry-After` on 503 answers when nothing fits."""
    metrics_path: str = "/metrics"
    status_path: str = "/irm/status"
    transport: str = "lean"
    """Upstream HTTP/1.1 transport under the httpx client: `lean` (`irmiddleware.http11`, for
    `http://` backends) or `httpx` (httpcore for everything)."""
    shutdown_grace_s: int | None = None
    """`irmiddleware serve` on SIGTERM/SIGINT: stop accepting, then let requests in flight finish
    for at most this many seconds before cutting them (their load is released, outcome `cancelled`).
    None (the default) waits for every one, so nothing in flight is lost."""
    access_log: bool = False
    """One log line per request (logger `irmiddleware.access`), written when it ends."""
    log_format: str = "text"
    """`irmiddleware serve`'s log lines: `text`, or `json` (one JSON object per line)."""
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    retries: RetriesConfig = field(default_factory=RetriesConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    outliers: OutliersConfig = field(default_factory=OutliersConfig)
    signals: SignalsConfig = field(default_factory=SignalsConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    cost: str = "requests"
    """What a request costs: `requests` (1 each; capacities count requests) or `tokens` (its
    uncached prompt tokens plus expected output tokens; capacities count tokens, `[router.tokens]`)."""
    tokens: TokensConfig = field(default_factory=TokensConfig)
    """`[router.speed]`: learned backend speed (doc/strategies.md, "Learned speed")."""
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    """`[admission]`: priority classes, bounded waiting, tenant limits (doc/admission.md)."""
    admin: AdminConfig = field(default_factory=AdminConfig)
    """`[admin]`: the admin listener and its token (doc/proxy.md, "Admin listener")."""
    discovery: tuple[DiscoveryConfig, ...] = ()
    """`[[discovery]]`: DNS names whose addresses join as backends (doc/proxy.md, "Discovery
    through DNS")."""
    workers: int = bounded(1, 1, WORKERS_MAX)
    """`irmiddleware serve`: worker processes on one shared-memory table (doc/workers.md); 1 (the
    default) serves from the one process, as ever."""
    shared_table: str = ""
    """The drop-in middleware in a multi-worker ASGI server: every worker attaches to this named
    shared-memory table, so capacity and tenant limits hold across them (doc/workers.md); "" (the
    default): a private table per process."""

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
    no_unknown_keys(data, {"router", "backends", "admission", "admin", "discovery"}, "")
    router = table(data, "router", "")
    no_unknown_keys(router, field_names(RouterConfig) - {"backends", "discovery"}, "router.")
    discovery = parse_discovery(data.get("discovery"))
    # With discovery, the fleet may start empty: the names' addresses fill it.
    backends = data.get("backends", [] if discovery else None)
    if not isinstance(backends, list) or not (backends or discovery):
        raise ConfigError(
            "`backends` must be a non-empty array of tables ([[backends]]), unless [[discovery]] is given"
        )

    def value(key: str) -> Any:
        return read(router, RouterConfig, key, "router.")

    config = RouterConfig(
        backends=tuple(_backend(entry, f"backends[{index}]") for index, entry in enumerate(backends)),
        strategy=value("strategy"),
        listen=check_listen(value("listen")),
        retry_after_s=value("retry_after_s"),
        metrics_path=_path(value("metrics_path"), "metrics_path"),
        status_path=_path(value("status_path"), "status_path"),
        transport=_one_of(value("transport"), "transport", ("lean", "httpx")),
        shutdown_grace_s=_optional_seconds(router, "shutdown_grace_s"),
        access_log=value("access_log"),
        log_format=_one_of(value("log_format"), "log_format", LOG_FORMATS),
        timeouts=section(router, "timeouts", TimeoutsConfig, "router."),
        limits=section(router, "limits", LimitsConfig, "router."),
        retries=section(router, "retries", RetriesConfig, "router."),
        health=section(router, "health", HealthConfig, "router."),
        outliers=section(router, "outliers", OutliersConfig, "router."),
        signals=section(router, "signals", SignalsConfig, "router."),
        affinity=section(router, "affinity", AffinityConfig, "router."),
        speed=_speed(section(router, "speed", SpeedConfig, "router.")),
        cost=_one_of(value("cost"), "cost", COSTS),
        tokens=section(router, "tokens", TokensConfig, "router."),
        probes=_probes(section(router, "probes", ProbesConfig, "router.")),
        admission=parse_admission(table(data, "admission", "")),
        admin=_admin(data, value("listen")),
        discovery=discovery,
        workers=value("workers"),
        shared_table=check_workers(value("workers"), value("shared_table")),
    )
    _no_duplicate_urls(config.backends)
    _one_type_per_model(config.backends)
    return config


def _speed(speed: SpeedConfig) -> SpeedConfig:
    if speed.alpha_min > speed.alpha_max:
        raise ConfigError(
            f"`router.speed.alpha_min` ({speed.alpha_min}) must not exceed `alpha_max` ({speed.alpha_max})"
        )
    return speed


def _admin(data: Mapping[str, Any], listen: str) -> AdminConfig:
    admin = section(data, "admin", AdminConfig, "")
    if admin.listen:
        check_listen(admin.listen, "admin.listen")
        if admin.listen == listen:
            raise ConfigError(f"`admin.listen` must differ from `router.listen`, got {admin.listen!r}")
    if admin.token_file and admin.token_env:
        raise ConfigError("give one of `admin.token_file` and `admin.token_env`, not both")
    return admin


def parse_backend(entry: object, where: str = "backend") -> BackendConfig:
    """One backend entry (a dict shaped like a `[[backends]]` table) checked as the configuration
    checks it: a canonical URL, bounded capacity and weight, known keys; ConfigError names `where`."""
    return _backend(entry, where)


def _backend(entry: object, where: str) -> BackendConfig:
    entry = array_entry(entry, BackendConfig, where, "url")
    prefix = f"{where}."
    return BackendConfig(
        url=_url(entry["url"], f"{where}.url"),
        type=read(entry, BackendConfig, "type", prefix),
        capacity=read(entry, BackendConfig, "capacity", prefix),
        models=strings(entry, "models", prefix),
        weight=read(entry, BackendConfig, "weight", prefix),
        metrics_url=_url(entry["metrics_url"], f"{where}.metrics_url") if "metrics_url" in entry else None,
        batch_slots=read(entry, BackendConfig, "batch_slots", prefix),
    )


def _optional_seconds(router: Mapping[str, Any], key: str) -> int | None:
    # Whole seconds: uvicorn's graceful-shutdown timeout is an int.
    if key not in router:
        return None
    seconds: int = get(router, key, int, "router.", None, low=0)
    return seconds


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _url(value: object, where: str) -> str:
    """`value` as one canonical http(s) base URL, so that two spellings of one server compare
    equal (`HTTP://Host:80/` is `http://host`): scheme and host in lower case, the scheme's
    default port dropped, no trailing slash. The path keeps its case (servers may tell it apart).
    Credentials are refused: the URL appears in status, metrics labels and logs, and the
    transport does not send them; the error message never repeats them."""
    shown = _redacted(value)
    parsed = urllib.parse.urlsplit(value) if isinstance(value, str) else None
    if parsed is None or parsed.scheme not in _DEFAULT_PORTS or not parsed.hostname:
        raise ConfigError(f"`{where}` must be an http(s) URL like http://127.0.0.1:9001, got {shown!r}")
    if parsed.username is not None or parsed.password is not None:
        raise ConfigError(
            f"`{where}` must not carry credentials (user:password@), got {shown!r}; "
            "authenticate the router to the backend at the network level"
        )
    if parsed.query or parsed.fragment:
        raise ConfigError(f"`{where}` must not have a query or fragment, got {shown!r}")
    try:
        port = parsed.port
    except ValueError:
        port = 0  # out of 0..65535, or not a number: `urlsplit` refuses to read it
    if port == 0:
        raise ConfigError(f"`{where}` must have a port in 1..65535, got {shown!r}")
    scheme, host = parsed.scheme, parsed.hostname
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc = f"{netloc}:{port}"
    return urllib.parse.urlunsplit((scheme, netloc, parsed.path.rstrip("/"), "", ""))


def _redacted(value: object) -> object:
    """`value` with a URL's `user:password@` replaced by `***@`, for error messages (a user name
    alone may be a token)."""
    if not isinstance(value, str):
        return value
    scheme, sep, rest = value.partition("://")
    userinfo, at, host = rest.partition("@")
    if not sep or not at or "/" in userinfo:
        return value
    return f"{scheme}{sep}***@{host}"


def check_listen(value: str, key: str = "router.listen") -> str:
    """`value` if it is HOST:PORT; ConfigError naming `key` otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"`{key}` must be HOST:PORT, got {value!r}")
    return value


def _one_of(value: str, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"`router.{key}` must be one of {', '.join(choices)}, got {value!r}")
    return value


def _probes(probes: ProbesConfig) -> ProbesConfig:
    _path(probes.health_path, "probes.health_path")
    _path(probes.ready_path, "probes.ready_path")
    _one_of(probes.ready, "probes.ready", READY_RULES)
    if probes.enabled and probes.health_path == probes.ready_path:
        raise ConfigError(f"`router.probes.health_path` and `ready_path` are both {probes.ready_path!r}")
    return probes


def _path(value: str, key: str) -> str:
    if not value.startswith("/"):
        raise ConfigError(f"`router.{key}` must start with '/', got {value!r}")
    return value


def _no_duplicate_urls(backends: Sequence[BackendConfig]) -> None:
    # URLs are canonical by now, so two spellings of one server meet here: listed twice, it would
    # get twice its capacity.
    seen: dict[str, int] = {}
    for index, backend in enumerate(backends):
        if backend.url in seen:
            first = f"`backends[{seen[backend.url]}].url`"
            raise ConfigError(f"`backends[{index}].url` {backend.url!r} is the server of {first}")
        seen[backend.url] = index


def _one_type_per_model(backends: Sequence[BackendConfig]) -> None:
    # A model's pool is served through its backends' adapter (doc/proxy.md, "Mixed fleets"), so
    # every backend of a pool must speak the same protocol.
    types: dict[str, tuple[str, int]] = {}
    for index, backend in enumerate(backends):
        for model in backend.models:
            kind, first = types.setdefault(model, (backend.type, index))
            if kind != backend.type:
                raise ConfigError(
                    f"`backends[{index}].models` lists {model!r}, which `backends[{first}]` serves as "
                    f"type {kind!r}: a model is served by backends of one type"
                )
