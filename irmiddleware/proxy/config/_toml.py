"""The validating readers every section of the configuration uses: one error type, one way to read
a typed value, one way to declare and check a bounded field.

A section is a frozen dataclass whose fields carry their bounds (`bounded`); `section` reads a
table into it, taking each key's type from the field's default. Every error names its key
(`router.timeouts.read_s`), so a bad file fails at startup with a message an operator can act on.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = [
    "ConfigError",
    "array_entry",
    "bounded",
    "default_of",
    "field_names",
    "get",
    "no_unknown_keys",
    "read",
    "section",
    "strings",
    "table",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


def bounded(default: Any, low: float, high: float | None = None) -> Any:
    """A dataclass field whose value must lie in `low..high` (`high` None: no upper bound). The
    bounds live with the field so that `section` checks every key the same way."""
    return dataclasses.field(default=default, metadata={"low": low, "high": high})


def section(parent: Mapping[str, Any], name: str, cls: type[T], prefix: str) -> T:
    """The table `parent[name]` (absent = empty) read into the dataclass `cls`: unknown keys are
    refused, each key takes the type of its field's default and the bounds declared with
    `bounded`, and absent keys keep their defaults."""
    values = table(parent, name, prefix)
    where = f"{prefix}{name}."
    no_unknown_keys(values, field_names(cls), where)
    specs = dataclasses.fields(typing.cast(Any, cls))
    return cls(**{spec.name: field_value(values, spec, where) for spec in specs if spec.name in values})


def read(values: Mapping[str, Any], cls: type[Any], name: str, prefix: str) -> Any:
    """The field `name` of the dataclass `cls` read from `values` (its default when absent), with
    the field's type and bounds: the single-key form of `section`."""
    return field_value(values, _field(cls, name), prefix)


def field_value(values: Mapping[str, Any], spec: dataclasses.Field[Any], prefix: str) -> Any:
    """`values[spec.name]` checked against the field's type and bounds; its default when absent."""
    value = get(values, spec.name, type(spec.default), prefix, spec.default, spec.metadata.get("low"))
    high = spec.metadata.get("high")
    if high is not None and value > high:
        raise ConfigError(f"`{prefix}{spec.name}` must be <= {high}, got {value!r}")
    return value


def get(
    values: Mapping[str, Any], key: str, kind: type, prefix: str, default: Any, low: float | None = None
) -> Any:
    """`values[key]` (else `default`) if it is a `kind` not below `low`; ConfigError otherwise.
    A float must be finite: TOML spells `nan` and `inf`, and neither is a usable timeout, weight or
    rate (a NaN compares false with every bound, so it would pass them all)."""
    value: Any = values.get(key, default)
    # bool is an int in Python; a `true` where a number belongs is a mistake, not 1.
    is_number = kind in (int, float) and not isinstance(value, bool)
    if kind is float and is_number and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind) or (kind in (int, float) and not is_number):
        raise ConfigError(f"`{prefix}{key}` must be {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(typing.cast(float, value)):
        raise ConfigError(f"`{prefix}{key}` must be a finite number, got {value!r}")
    if low is not None and typing.cast(float, value) < low:
        raise ConfigError(f"`{prefix}{key}` must be >= {low}, got {value!r}")
    return value


def table(data: Mapping[str, Any], key: str, prefix: str) -> Mapping[str, Any]:
    """The sub-table `data[key]` (absent = empty); ConfigError when it is not a table."""
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"`{prefix}{key}` must be a table")
    return value


def array_entry(entry: object, cls: type[Any], where: str, required: str) -> Mapping[str, Any]:
    """One table of an array of tables (`backends[0]`, `discovery[1]`): ConfigError naming `where`
    unless it is a table of `cls`'s keys that has the key `required`."""
    if not isinstance(entry, dict):
        raise ConfigError(f"`{where}` must be a table")
    no_unknown_keys(entry, field_names(cls), f"{where}.")
    if required not in entry:
        raise ConfigError(f"`{where}.{required}` is required")
    return entry


def strings(values: Mapping[str, Any], key: str, prefix: str) -> tuple[str, ...]:
    """`values[key]` (absent = empty) as non-empty strings, each once, in order."""
    items = values.get(key, [])
    if not isinstance(items, list) or not all(isinstance(item, str) and item for item in items):
        raise ConfigError(f"`{prefix}{key}` must be an array of non-empty strings")
    return tuple(dict.fromkeys(items))


def no_unknown_keys(values: Mapping[str, Any], known: set[str], prefix: str) -> None:
    """ConfigError naming the first key of `values` not in `known`, and listing the valid ones."""
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key `{prefix}{unknown[0]}`; valid keys: {', '.join(sorted(known))}")


def default_of(cls: type[Any], name: str) -> Any:
    """The default of field `name` of a dataclass."""
    return _field(cls, name).default


def _field(cls: type[Any], name: str) -> dataclasses.Field[Any]:
    # Slotted dataclasses keep defaults only in their fields, not as class attributes.
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def field_names(cls: type[Any]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}
