"""Which requests the router routes: the adapters' endpoints, indexed once, and the app behind a
standalone router (404 for everything else)."""

from __future__ import annotations

import json
from collections.abc import Iterable

from irmiddleware.hooks import BackendAdapter, Endpoint
from irmiddleware.proxy._exchange import Receive, Scope, Send, respond
from irmiddleware.proxy._fleet import Backend

__all__ = ["Routes", "not_found"]


class Routes:
    """The endpoints of the fleet's adapters. Exact paths are indexed once, so dispatch costs one
    dict lookup per request; adapters with path parameters (Triton's /v2/models/{name}/infer)
    override `match` and are asked, one per type, only for paths the index does not know."""

    def __init__(self, backends: Iterable[Backend]) -> None:
        self._exact: dict[str, tuple[Endpoint, BackendAdapter]] = {}
        matchers: dict[type[BackendAdapter], BackendAdapter] = {}
        for backend in backends:
            adapter = backend.adapter
            for endpoint in adapter.endpoints:
                # The first backend's adapter for a path handles it (adapters of one protocol
                # family agree on these paths); templates are matched by the adapter.
                if "{" not in endpoint.path:
                    self._exact.setdefault(endpoint.path, (endpoint, adapter))
            if type(adapter).match is not BackendAdapter.match:
                matchers.setdefault(type(adapter), adapter)
        self._matchers = tuple(matchers.values())

    def find(self, method: str, path: str) -> tuple[Endpoint, BackendAdapter] | None:
        """The endpoint and adapter routing `method path`; None when the router does not route it."""
        found = self._exact.get(path)
        if found is None:
            found = self._match(method, path)
        return found if found is not None and method in found[0].methods else None

    def _match(self, method: str, path: str) -> tuple[Endpoint, BackendAdapter] | None:
        for adapter in self._matchers:
            endpoint = adapter.match(method, path)
            if endpoint is not None:
                return endpoint, adapter
        return None


async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """The app behind a standalone router: 404 for unrouted paths, and a lifespan that works."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "http":
        error = {
            "message": f"No route for {scope['path']}",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        }
        await respond(send, 404, json.dumps({"error": error}).encode())
