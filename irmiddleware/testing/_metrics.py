"""Prometheus text for the three emulators: one mechanism, the two dialects their servers write.

vLLM exports with prometheus_client, which names a counter's samples `<name>_total`, adds a
`<name>_created` series to counters and histograms, and writes every number as a float. Triton
(prometheus-cpp) and TGI (metrics-exporter-prometheus) name counters exactly as declared, without
`_created`, and write whole numbers without a decimal point. `Metrics(client_style=True)` writes the
first dialect and `Metrics()` the second; an emulator only declares its families (names, help texts,
labels, buckets) and updates them.

Every emulator keeps its own `Metrics`, so several emulators can share a process.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Generic, TypeVar

from prometheus_client.utils import floatToGoString

__all__ = ["PROMETHEUS_TEXT", "Family", "Histogram", "Metrics", "Value"]

# The Prometheus text exposition format, version 0.0.4 (what Triton and TGI serve).
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

Labels = Mapping[str, str]
Sample = tuple[str, Labels, float]


class Value:
    """One counter or gauge series."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = value

    def samples(self, name: str, labels: Labels, number: Callable[[float], str]) -> list[Sample]:
        return [(name, labels, self.value)]


class Histogram:
    """Cumulative buckets, sum and count of one histogram series."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(buckets)
        self._counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self._counts[index] += 1

    def samples(self, name: str, labels: Labels, number: Callable[[float], str]) -> list[Sample]:
        out: list[Sample] = [
            (f"{name}_bucket", {**labels, "le": number(bound)}, count)
            for bound, count in zip(self.buckets, self._counts, strict=True)
        ]
        out.append((f"{name}_bucket", {**labels, "le": "+Inf"}, self.count))
        out += [(f"{name}_sum", labels, self.sum), (f"{name}_count", labels, self.count)]
        return out


S = TypeVar("S", Value, Histogram)


class Family(Generic[S]):
    """One metric family: a series per combination of label values, exported in creation order."""

    def __init__(
        self,
        name: str,
        kind: str,
        help_text: str,
        labels: tuple[Labels, tuple[str, ...]],
        make: Callable[[], S],
    ) -> None:
        self.name = name
        self.kind = kind
        self.help_text = help_text
        self.const_labels, self.labelnames = labels
        self._make: Callable[[], S] = make
        self._series: dict[tuple[str, ...], tuple[S, float]] = {}

    def labels(self, **labels: str) -> S:
        """The series of these label values (every label name but the constant ones, no other),
        created at first use; call it early to export a series before anything happened to it."""
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes the labels {self.labelnames}, got {tuple(labels)}")
        key = tuple(labels[name] for name in self.labelnames)
        if key not in self._series:
            self._series[key] = (self._make(), time.time())
        return self._series[key][0]

    def render(self, client_style: bool) -> str:
        number = floatToGoString if client_style else _number
        exposed = f"{self.name}_total" if client_style and self.kind == "counter" else self.name
        samples: list[Sample] = []
        created: list[Sample] = []
        for key, (series, created_at) in self._series.items():
            labels = {**self.const_labels, **dict(zip(self.labelnames, key, strict=True))}
            samples += series.samples(exposed, labels, number)
            created.append((f"{self.name}_created", labels, created_at))
        text = _family(exposed, self.kind, self.help_text, samples, number)
        if client_style and self.kind != "gauge":
            text += _family(f"{self.name}_created", "gauge", self.help_text, created, number)
        return text


class Metrics:
    """The metric families of one emulator, in the order they are declared; `const_labels` are
    on every series (vLLM's `model_name` and `engine`)."""

    def __init__(self, client_style: bool = False, const_labels: Labels | None = None) -> None:
        self.client_style = client_style
        self.const_labels = dict(const_labels or {})
        self._families: list[Family[Value] | Family[Histogram]] = []

    def counter(self, name: str, help_text: str, *labelnames: str) -> Family[Value]:
        return self._add(Family(name, "counter", help_text, (self.const_labels, labelnames), Value))

    def gauge(self, name: str, help_text: str, *labelnames: str) -> Family[Value]:
        return self._add(Family(name, "gauge", help_text, (self.const_labels, labelnames), Value))

    def histogram(
        self, name: str, help_text: str, buckets: Iterable[float], *labelnames: str
    ) -> Family[Histogram]:
        make = functools.partial(Histogram, tuple(buckets))
        return self._add(Family(name, "histogram", help_text, (self.const_labels, labelnames), make))

    def _add(self, family: Family[S]) -> Family[S]:
        self._families.append(family)
        return family

    def render(self) -> str:
        """Every family in the text format (set gauges that mirror live state first)."""
        return "".join(family.render(self.client_style) for family in self._families)


def _family(
    name: str, kind: str, help_text: str, samples: list[Sample], number: Callable[[float], str]
) -> str:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for sample_name, labels, value in samples:
        rendered = ",".join(f'{key}="{_escape(val)}"' for key, val in sorted(labels.items()))
        selector = f"{sample_name}{{{rendered}}}" if rendered else sample_name
        lines.append(f"{selector} {number(value)}")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
