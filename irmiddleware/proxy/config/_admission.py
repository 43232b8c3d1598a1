"""The `[admission]` table of the router configuration: priority classes, bounded waiting, tenant limits.

Read into frozen dataclasses once at startup; every error names its key
(`admission.classes.3.max_wait_s`). See doc/admission.md for the model and a runnable example.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from irmiddleware._native import CLASSES_COUNT, DEFAULT_CLASS_SHARES
from irmiddleware.proxy.config._toml import (
    ConfigError,
    bounded,
    default_of,
    field_names,
    get,
    no_unknown_keys,
    read,
    table,
)

__all__ = ["AdmissionConfig", "ClassConfig", "TenantConfig", "parse_admission"]


@dataclass(frozen=True, slots=True)
class ClassConfig:
    """`[admission.classes.N]`: overrides for one class. None = the `[admission]` value."""

    max_queue: int | None = None
    """Waiters of this class at most (within the global `max_queue`)."""
    max_wait_s: float | None = None
    """Longest wait of a request of this class before it is shed with 503."""


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """`[admission.tenants."KEY"]` and `[admission.tenant_defaults]`: one tenant's class and limits.
    0 means "no limit"."""

    default_class: int | None = None
    """Class of this tenant's requests that name none (between header/body and the route default)."""
    max_concurrency: int = bounded(0, 0)
    """Requests of this tenant waiting or in flight at once; more get 429."""
    rate_per_s: float = bounded(0.0, 0)
    """Sustained requests per second (token bucket); faster gets 429 with Retry-After."""
    burst: int = bounded(0, 0)
    """Bucket size; 0 = max(1, ceil(rate_per_s))."""

    @property
    def limited(self) -> bool:
        return self.max_concurrency > 0 or self.rate_per_s > 0

    @property
    def bucket_size(self) -> float:
        return float(self.burst or max(1, math.ceil(self.rate_per_s)))


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    """`[admission]`. The defaults keep the router's behaviour without the table: every request is
    class 0 unless it names another, and nothing waits (`max_queue = 0`: 503 at once)."""

    header: str = "x-irm-priority"
    """Request header naming the class (0-7); "" = do not read a header."""
    body_priority: bool = True
    """Read the JSON body's `priority` (vLLM; lower runs earlier) when the header is absent."""
    default_class: int = 0
    """Class of requests that name none and have no tenant or route default."""
    forward_priority: bool = False
    """Write the class into the body's `priority` field for vLLM backends (they must run
    `--scheduling-policy priority`, otherwise a non-zero value is a 400)."""
    class_shares: tuple[float, ...] = DEFAULT_CLASS_SHARES
    """Share of each backend's capacity that class k may fill (non-increasing, 0 < share <= 1)."""
    max_queue: int = bounded(0, 0)
    """Requests waiting for capacity at most, all classes; 0 = never wait (503 at once)."""
    max_wait_s: float = bounded(10.0, 0.001)
    """Longest wait for capacity before 503 (per class: `classes.N.max_wait_s`)."""
    aging_s: float = bounded(1.0, 0)
    """A waiter is promoted one class per `aging_s` waited (0 = never): it is then ordered and
    admitted like that class, so lower classes cannot starve."""
    classes: tuple[ClassConfig, ...] = (ClassConfig(),) * CLASSES_COUNT
    routes: Mapping[str, int] = field(default_factory=dict)
    """Default class per request path (e.g. `"/v1/embeddings" = 5`)."""
    tenant_header: str = "authorization"
    """Header identifying a tenant (`Authorization: Bearer KEY` counts as KEY); "" = no tenants."""
    tenants: Mapping[str, TenantConfig] = field(default_factory=dict)
    tenant_defaults: TenantConfig = TenantConfig()
    """Limits of every tenant not listed in `tenants`."""

    def max_wait_of(self, priority: int) -> float:
        own = self.classes[priority].max_wait_s
        return self.max_wait_s if own is None else own

    def max_queue_of(self, priority: int) -> int:
        own = self.classes[priority].max_queue
        return self.max_queue if own is None else min(own, self.max_queue)


def parse_admission(values: Mapping[str, Any]) -> AdmissionConfig:
    """Validates the `[admission]` table (empty = defaults); ConfigError names the key."""
    prefix = "admission."
    no_unknown_keys(values, field_names(AdmissionConfig), prefix)

    def value(key: str) -> Any:
        return read(values, AdmissionConfig, key, prefix)

    return AdmissionConfig(
        header=value("header").lower(),
        body_priority=value("body_priority"),
        default_class=_class(values, "default_class", prefix, default_of(AdmissionConfig, "default_class")),
        forward_priority=value("forward_priority"),
        class_shares=_shares(values.get("class_shares", list(DEFAULT_CLASS_SHARES))),
        max_queue=value("max_queue"),
        max_wait_s=value("max_wait_s"),
        aging_s=value("aging_s"),
        classes=_classes(table(values, "classes", prefix)),
        routes=_routes(table(values, "routes", prefix)),
        tenant_header=value("tenant_header").lower(),
        tenants={
            key: _tenant(entry, f'admission.tenants."{key}".')
            for key, entry in table(values, "tenants", prefix).items()
        },
        tenant_defaults=_tenant(values.get("tenant_defaults", {}), "admission.tenant_defaults."),
    )


def _class(values: Mapping[str, Any], key: str, prefix: str, default: int | None) -> Any:
    if key not in values:
        return default
    priority = get(values, key, int, prefix, default, low=0)
    if priority >= CLASSES_COUNT:
        raise ConfigError(f"`{prefix}{key}` must be a class 0..{CLASSES_COUNT - 1}, got {priority}")
    return priority


def _shares(shares: object) -> tuple[float, ...]:
    where = "`admission.class_shares`"
    if not isinstance(shares, list) or len(shares) != CLASSES_COUNT:
        raise ConfigError(f"{where} must be an array of {CLASSES_COUNT} numbers, got {shares!r}")
    for index, share in enumerate(shares):
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0.001 <= share <= 1:
            raise ConfigError(f"`admission.class_shares[{index}]` must be in 0.001..1, got {share!r}")
    # Non-increasing, so a request that fits never blocks a more urgent one that would not:
    # the queue's order and the core's shares then agree on who goes first.
    for index in range(1, CLASSES_COUNT):
        if shares[index] > shares[index - 1]:
            raise ConfigError(
                f"`admission.class_shares[{index}]` ({shares[index]}) exceeds the share of the more "
                f"urgent class {index - 1} ({shares[index - 1]}); shares must not increase"
            )
    return tuple(float(share) for share in shares)


def _classes(values: Mapping[str, Any]) -> tuple[ClassConfig, ...]:
    classes = [ClassConfig()] * CLASSES_COUNT
    for key, entry in values.items():
        if not key.isdigit() or int(key) >= CLASSES_COUNT:
            raise ConfigError(f"`admission.classes.{key}`: classes are 0..{CLASSES_COUNT - 1}")
        prefix = f"admission.classes.{key}."
        if not isinstance(entry, dict):
            raise ConfigError(f"`{prefix[:-1]}` must be a table")
        no_unknown_keys(entry, field_names(ClassConfig), prefix)
        classes[int(key)] = ClassConfig(
            max_queue=_optional(entry, "max_queue", int, prefix, 0),
            max_wait_s=_optional(entry, "max_wait_s", float, prefix, 0.001),
        )
    return tuple(classes)


def _optional(values: Mapping[str, Any], key: str, kind: type, prefix: str, low: float) -> Any:
    return get(values, key, kind, prefix, None, low=low) if key in values else None


def _routes(values: Mapping[str, Any]) -> dict[str, int]:
    routes: dict[str, int] = {}
    for path in values:
        if not path.startswith("/"):
            raise ConfigError(f'`admission.routes."{path}"`: a route is a path starting with "/"')
        routes[path] = _class(values, path, "admission.routes.", None)
    return routes


def _tenant(entry: object, prefix: str) -> TenantConfig:
    if not isinstance(entry, dict):
        raise ConfigError(f"`{prefix[:-1]}` must be a table")
    no_unknown_keys(entry, field_names(TenantConfig), prefix)
    return TenantConfig(
        default_class=_class(entry, "default_class", prefix, None),
        max_concurrency=read(entry, TenantConfig, "max_concurrency", prefix),
        rate_per_s=read(entry, TenantConfig, "rate_per_s", prefix),
        burst=read(entry, TenantConfig, "burst", prefix),
    )
