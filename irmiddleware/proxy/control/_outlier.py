"""Passive outlier detection: live traffic decides when a backend should be left alone for a while.

Consecutive connection failures, or consecutive errors (5xx, broken answers, timeouts, overload
answers), eject a backend for a cool-down of `base_ejection_s * 2**n` (n = its earlier ejections,
forgiven after a clean `max_ejection_s`), capped at `max_ejection_s`. An overload answer also
earns a short fixed penalty, so a full backend is skipped at once without being called broken.

This module only keeps the books, on a clock the caller passes in; `FleetHealth` (`_health`) turns
ejections into native states (with the panic threshold) and re-admits a backend once its cool-down
is over and a health check passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from irmiddleware.proxy._outcomes import AttemptOutcome
from irmiddleware.proxy.config import OutliersConfig

__all__ = ["OutlierDetector"]

# Attempt outcomes -> the kind of failure they are.
# Outcomes not listed ("client_disconnected", "cancelled", "internal") say nothing about the backend.
_FAILURES: Final[dict[AttemptOutcome, str]] = {
    "connect_error": "connect",
    "upstream_error": "upstream",
    "timeout": "timeout",
    "overloaded": "overload",
}


@dataclass(slots=True)
class _Record:
    connect_failures: int = 0
    errors: int = 0
    offences: int = 0
    """Ejections so far (the exponent of the next cool-down)."""
    ejected_until: float = 0.0
    """Monotonic time the cool-down ends; 0.0 when not ejected."""
    reason: str = ""
    last_end: float = 0.0


class OutlierDetector:
    """Per-backend failure streaks and ejections."""

    def __init__(self, config: OutliersConfig, backend_ids: list[int]) -> None:
        self.config = config
        self._records = {backend_id: _Record() for backend_id in backend_ids}

    def add(self, backend_id: int) -> None:
        """Keeps a record of a backend added while routing goes on."""
        self._records.setdefault(backend_id, _Record())

    def remove(self, backend_id: int) -> None:
        self._records.pop(backend_id, None)

    def observe(
        self, backend_id: int, outcome: AttemptOutcome, status: int | None, overload: bool, now: float
    ) -> str | None:
        """Records one attempt's result; returns the ejection reason when it ejects the backend
        ("connect", "5xx", "upstream", "timeout", "overload"), else None. `overload` is True when
        the status is one of the adapter's overload statuses."""
        record = self._records.get(backend_id)
        if record is None or not self.config.enabled or record.ejected_until:
            return None  # already out (traffic reaches it only in panic): keep its cool-down as is
        kind = _kind_of(outcome, status, overload)
        if kind is None:
            if outcome == "ok" or (outcome == "backend_error" and (status or 0) < 500):
                record.connect_failures = record.errors = 0
            return None
        if kind == "connect":
            record.connect_failures += 1
            if record.connect_failures >= self.config.consecutive_connect_failures:
                return self._eject(record, kind, now, self._cool_down(record, now))
            return None
        record.errors += 1
        if record.errors >= self.config.consecutive_errors:
            return self._eject(record, kind, now, self._cool_down(record, now))
        if kind == "overload" and self.config.overload_penalty_s > 0:
            # A full backend is not broken: a short fixed penalty, which does not grow.
            return self._eject(record, kind, now, self.config.overload_penalty_s, offence=False)
        return None

    def is_ejected(self, backend_id: int) -> bool:
        return bool(self._records[backend_id].ejected_until)

    def reason(self, backend_id: int) -> str:
        return self._records[backend_id].reason

    def cooled_down(self, backend_id: int, now: float) -> bool:
        """True when the backend is ejected and its cool-down is over (a health check may now
        re-admit it)."""
        until = self._records[backend_id].ejected_until
        return bool(until) and now >= until

    def ejection_end(self, backend_id: int) -> float | None:
        until = self._records[backend_id].ejected_until
        return until or None

    def readmit(self, backend_id: int, now: float) -> None:
        record = self._records[backend_id]
        record.ejected_until = 0.0
        record.connect_failures = record.errors = 0
        record.last_end = now

    @property
    def ejected_count(self) -> int:
        return sum(1 for record in self._records.values() if record.ejected_until)

    def _cool_down(self, record: _Record, now: float) -> float:
        if record.offences and now - record.last_end > self.config.max_ejection_s:
            record.offences = 0  # clean for a whole maximum cool-down: earlier offences forgiven
        # min() first keeps the power bounded however many offences pile up.
        exponent = min(record.offences, 32)
        return float(min(self.config.base_ejection_s * 2**exponent, self.config.max_ejection_s))

    @staticmethod
    def _eject(record: _Record, kind: str, now: float, cool_down_s: float, offence: bool = True) -> str:
        record.ejected_until = now + cool_down_s
        record.reason = kind
        if offence:
            record.offences += 1
        return kind


def _kind_of(outcome: AttemptOutcome, status: int | None, overload: bool) -> str | None:
    if outcome == "backend_error" and overload:
        return "overload"  # relayed as is: no other backend could take it
    if outcome == "backend_error" and (status or 0) >= 500:
        return "5xx"
    return _FAILURES.get(outcome)
