"""What the router answers from its own view of the fleet: the JSON status document, the Prometheus
metrics, and the adapters' "models" and "health" endpoints (`Endpoint.kind`)."""

from __future__ import annotations

import json
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from irmiddleware.hooks import BackendAdapter, Endpoint
from irmiddleware.proxy._admission import Admission
from irmiddleware.proxy._exchange import JSON_HEADERS, ClientExchange, Send, respond
from irmiddleware.proxy._fleet import Fleet
from irmiddleware.proxy._metrics import RouterMetrics
from irmiddleware.proxy.config import RouterConfig
from irmiddleware.proxy.control import FleetMonitor, SpeedFeed

__all__ = ["StatusResponder"]

_METRICS_HEADERS = ((b"content-type", CONTENT_TYPE_LATEST.encode()),)


class StatusResponder:
    """Answers `GET metrics_path`, `GET status_path` and the adapters' own endpoints."""

    def __init__(
        self,
        config: RouterConfig,
        fleet: Fleet,
        monitor: FleetMonitor,
        admission: Admission,
        metrics: RouterMetrics,
    ) -> None:
        self._paths = {config.metrics_path: self._metrics, config.status_path: self._status}
        self.fleet, self.monitor, self.admission, self.metrics = fleet, monitor, admission, metrics
        self._created = int(time.time())
        self.speed: SpeedFeed | None = None
        """Learned speed, shown beside each backend when the router learns it."""

    async def answer(self, path: str, method: str, send: Send) -> bool:
        """Answers a status or metrics request; False when `path` is neither (or not a GET)."""
        responder = self._paths.get(path)
        if responder is None or method != "GET":
            return False
        await responder(send)
        return True

    async def answer_endpoint(self, endpoint: Endpoint, exchange: ClientExchange) -> None:
        """The router's own answer to an adapter's "models" or "health" endpoint."""
        adapter: BackendAdapter = exchange.adapter
        if endpoint.kind == "models":
            body = adapter.models_body(self.fleet.models_at(endpoint.path), self._created)
            await exchange.answer(200, body, JSON_HEADERS)
            return
        # Ready when a backend this path's clients can reach takes requests (a TGI client is not
        # served by an active Triton server).
        reachable = {b.id for b in self.fleet.backends.values() if endpoint in b.adapter.endpoints}
        ready = not reachable.isdisjoint(self.fleet.active_ids())
        status, body = adapter.health_answer(ready)
        await exchange.answer(status, body, JSON_HEADERS if body else ())

    async def _metrics(self, send: Send) -> None:
        await respond(send, 200, self.metrics.exposition(), _METRICS_HEADERS)

    async def _status(self, send: Send) -> None:
        await respond(send, 200, json.dumps(self.status()).encode())

    def status(self) -> dict[str, Any]:
        """The JSON status document: strategy, models and every backend's state and load."""
        backends = []
        for url, stats in self.fleet.backend_stats():
            backend = self.fleet.backends[stats.id]
            backends.append(
                {
                    "id": stats.id,
                    "url": url,
                    "type": backend.type,
                    "models": list(backend.models),
                    "state": stats.state,
                    "capacity": stats.capacity,
                    "weight": stats.weight,
                    "load": stats.load,
                    "requests_in_flight": stats.requests_in_flight,
                    "routed": stats.routed,
                    "completed": stats.completed,
                    "failed": stats.failed,
                    "latency_ewma_s": stats.latency_ewma_s,
                    **self.monitor.status_of(stats.id),
                    **(self.speed.status_of(stats.id) if self.speed is not None else {}),
                }
            )
        return {
            "strategy": self.fleet.strategy_name,
            "models": self.fleet.models,
            "backends": backends,
            "admission": self.admission.status(),
        }
