"""The `[[discovery]]` entries of the router configuration: DNS names whose addresses are the
backends (a Kubernetes headless Service, Consul, any name with one A/AAAA record per server).
See doc/proxy.md, "Discovery through DNS"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from irmiddleware._native import CAPACITY_MAX, WEIGHT_MILLI_MAX
from irmiddleware.proxy.config._toml import ConfigError, array_entry, bounded, get, read, strings

__all__ = ["DiscoveryConfig", "parse_discovery"]


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """One `[[discovery]]` entry: every address `dns` resolves to becomes a backend
    `http://ADDRESS:PORT` with this type, capacity, weight and models."""

    dns: str
    """HOST:PORT: the name to resolve and the port every address serves on."""
    type: str = "vllm"
    capacity: int = bounded(64, 1, CAPACITY_MAX)
    models: tuple[str, ...] = ()
    """Empty = ask each discovered backend its models (as for `[[backends]]`)."""
    weight: float = bounded(1.0, 0.001, WEIGHT_MILLI_MAX / 1000)
    interval_s: float = bounded(5.0, 0.05)
    """How often the name is resolved again."""
    timeout_s: float = bounded(2.0, 0.001)
    """One resolution's bound; a slower one counts as failed (and changes nothing)."""
    resolver: str = ""
    """HOST:PORT of a nameserver to ask directly over UDP (needs `dnslib`); "" = the system's
    resolver (`getaddrinfo`, as every other program on the host resolves)."""

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.dns.rpartition(":")
        return host.strip("[]"), int(port)


def parse_discovery(entries: object) -> tuple[DiscoveryConfig, ...]:
    """The `[[discovery]]` array (absent = none); ConfigError naming `discovery[N].key`."""
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise ConfigError("`discovery` must be an array of tables ([[discovery]])")
    parsed = tuple(_entry(entry, f"discovery[{index}]") for index, entry in enumerate(entries))
    seen: dict[str, int] = {}
    for index, entry in enumerate(parsed):
        if entry.dns in seen:
            raise ConfigError(
                f"`discovery[{index}].dns` {entry.dns!r} is the name of `discovery[{seen[entry.dns]}]`"
            )
        seen[entry.dns] = index
    return parsed


def _entry(entry: object, where: str) -> DiscoveryConfig:
    entry = array_entry(entry, DiscoveryConfig, where, "dns")
    prefix = f"{where}."

    def value(key: str) -> Any:
        return read(entry, DiscoveryConfig, key, prefix)

    return DiscoveryConfig(
        dns=_host_port(get(entry, "dns", str, prefix, None), f"{where}.dns", port_required=True),
        type=value("type"),
        capacity=value("capacity"),
        models=strings(entry, "models", prefix),
        weight=value("weight"),
        interval_s=value("interval_s"),
        timeout_s=value("timeout_s"),
        resolver=_host_port(value("resolver"), f"{where}.resolver", port_required=False),
    )


def _host_port(value: str, key: str, *, port_required: bool) -> str:
    """`value` if it is HOST:PORT with a port in 1..65535 ("" allowed when not `port_required`)."""
    if not value and not port_required:
        return value
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 or "/" in host:
        raise ConfigError(f"`{key}` must be HOST:PORT with a port in 1..65535, got {value!r}")
    return value
