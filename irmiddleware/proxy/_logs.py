"""The router's log lines: the two formats of `irmiddleware serve` (`text`, `json`), the access log
and the startup summary.

The JSON format is a `logging.Formatter` subclass of the standard library, not a dependency: a
line is one `json.dumps` of a fixed set of keys (time, level, logger, message) plus the record's
`extra` fields, which is all python-json-logger would do for us here (its field renaming, custom
encoders and format-string parsing go unused), and `irmiddleware serve` stays installable with
uvicorn alone.

The access log (`[router] access_log`, `--access-log`) is one INFO line per request on the logger
`irmiddleware.access`, written once, when the request's outcome is final; its fields are also the
record's `extra` attributes, so the JSON format has them as keys.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final

from irmiddleware.proxy._exchange import ClientExchange
from irmiddleware.proxy._fleet import Fleet

__all__ = ["ACCESS_LOGGER", "JsonFormatter", "access_line", "configure_logging", "startup_summary"]

ACCESS_LOGGER: Final = "irmiddleware.access"

_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The attributes every `LogRecord` has: whatever else a record carries came as `extra`.
# uvicorn adds `color_message`, its message with terminal colour codes: not for a JSON line.
_STANDARD: Final = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `time` (ISO 8601, UTC), `level`, `logger`, `message`, the
    record's `extra` fields, and `exception` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        # `default=str`: an extra of a type JSON lacks is written as text, never a lost line.
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(level: str, log_format: str, *, access_log: bool = False) -> None:
    """Sends every logger's lines (the router's, uvicorn's, httpx's warnings) to stderr in
    `log_format` ("text" or "json") from `level` up. uvicorn must then be run with
    `log_config=None`, so that it installs no handlers of its own. With `access_log`, the access
    lines (INFO) are written whatever `level` is: turning the access log on asks for them."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every upstream request at INFO: a line per proxied request (and ~2 % of the
    # proxy's CPU, measured with py-spy). The router's own metrics and access log count requests.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO if access_log else logging.NOTSET)


def access_line(log: logging.Logger, exchange: ClientExchange, model: str) -> None:
    """Writes the access-log line of a finished request: request id, client, method, path, model,
    backend, status ("-" when none was sent), outcome, time to first byte and duration."""
    now = time.perf_counter()
    scope = exchange.scope
    client = scope.get("client")
    fields: dict[str, Any] = {
        "request_id": exchange.request_id.decode("ascii"),
        "client": client[0] if client else None,
        "method": scope["method"],
        "path": scope["path"],
        "model": model,
        "backend": exchange.backend_url,
        "status": exchange.status,
        "outcome": exchange.outcome,
        "ttfb_s": round(exchange.first_byte_s - exchange.started_s, 6) if exchange.first_byte_s else None,
        "duration_s": round(now - exchange.started_s, 6),
    }
    log.info(
        "%s %s %s %s model=%s backend=%s status=%s outcome=%s ttfb_ms=%s duration_ms=%.1f",
        fields["request_id"],
        fields["client"] or "-",
        fields["method"],
        fields["path"],
        model,
        fields["backend"],
        exchange.status or "-",
        fields["outcome"],
        "-" if fields["ttfb_s"] is None else f"{fields['ttfb_s'] * 1000:.1f}",
        fields["duration_s"] * 1000,
        extra=fields,
    )


def startup_summary(log: logging.Logger, fleet: Fleet, listen: str | None) -> None:
    """The startup line: where the router listens (`None`: inside another app), its strategy, and
    each backend with its type, capacity and models (after discovery)."""
    backends: list[dict[str, Any]] = []
    shown: list[str] = []
    for url, stats in fleet.backend_stats():
        backend = fleet.backends[stats.id]
        models = list(backend.models)
        backends.append({"url": url, "type": backend.type, "capacity": stats.capacity, "models": models})
        listed = ", ".join(models) or "none"
        shown.append(f"{url} ({backend.type}, capacity {stats.capacity}, models {listed})")
    where = f"listening on {listen}, " if listen else ""
    log.info(
        "router started: %sstrategy %s, %d backends: %s",
        where,
        fleet.strategy_name,
        len(backends),
        "; ".join(shown),
        extra={"listen": listen, "strategy": fleet.strategy_name, "backends": backends},
    )
