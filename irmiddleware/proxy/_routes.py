"""Which requests the router routes, and through which adapter: the adapters' endpoints, indexed
once, the model-first choice of the adapter for a request, and the app behind a standalone router
(404 for everything else).

Several protocol families may claim one path (vLLM and TGI both serve `/v1/chat/completions`).
The request's model decides, never the order of the configuration: the model a request names picks
its pool, and the pool's backends' adapter handles the request (doc/proxy.md, "Mixed fleets").
"""

from __future__ import annotations

import json

from irmiddleware.hooks import AdapterError, BackendAdapter, Endpoint
from irmiddleware.proxy._exchange import Receive, Reject, Scope, Send, respond
from irmiddleware.proxy._fleet import Fleet

__all__ = ["Routes", "not_found"]

Claim = tuple[Endpoint, BackendAdapter]
"""An adapter's endpoint for a path: the adapter would route the request."""


class Routes:
    """The endpoints of the fleet's adapters. Exact paths are indexed once, so dispatch costs one
    dict lookup per request; adapters with path parameters (Triton's /v2/models/{name}/infer)
    override `match` and are asked, one per type, only for paths the index does not know.

    The claims on a path are ordered so that the choice never depends on the configuration's order:
    adapters of protocols whose requests must name their model first, `single_model` ones (TGI,
    whose requests may name none) last, then by type name. The first claim answers what needs no
    model (model lists, health) and the errors of a request no claim can route."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        adapters = {backend.adapter.type_name: backend.adapter for backend in fleet.backends.values()}
        ordered = sorted(adapters.values(), key=lambda a: (a.single_model, a.type_name))
        exact: dict[str, list[Claim]] = {}
        for adapter in ordered:
            for endpoint in adapter.endpoints:
                if "{" not in endpoint.path:  # templates are matched by the adapter
                    exact.setdefault(endpoint.path, []).append((endpoint, adapter))
        self._exact = {path: tuple(claims) for path, claims in exact.items()}
        self._matchers = tuple(a for a in ordered if type(a).match is not BackendAdapter.match)

    def find(self, method: str, path: str) -> Claim | None:
        """The first claim on `method path`; None when the router does not route it."""
        claims = self._claims(method, path)
        return claims[0] if claims else None

    def _claims(self, method: str, path: str) -> tuple[Claim, ...]:
        claims = self._exact.get(path)
        if claims is None:
            found = ((adapter.match(method, path), adapter) for adapter in self._matchers)
            return tuple((endpoint, adapter) for endpoint, adapter in found if endpoint is not None)
        if len(claims) == 1:
            return claims if method in claims[0][0].methods else ()
        return tuple(claim for claim in claims if method in claim[0].methods)

    def resolve(
        self, found: Claim, method: str, path: str, body: bytes
    ) -> tuple[Endpoint, BackendAdapter, str]:
        """The endpoint, adapter and model pool of an inference request. A claim whose adapter
        reads a model served by backends of its own type wins; else a `single_model` claim whose
        request names no model (`model_of` returns "") takes the one model its type serves.
        `AdapterError(404)` when no claim can route it (an unknown model, or a model of another
        protocol), or the first claim's `AdapterError` when none could read the request; `Reject`
        (503) instead of the 404 while some backend's models are still unknown. `found` is what
        `find` returned for the request."""
        # With one template adapter (the usual Triton fleet), `found` is its only claim on a path
        # the index does not know: no second regex match per request.
        single = path not in self._exact and len(self._matchers) == 1
        read: list[tuple[Endpoint, BackendAdapter, str]] = []
        error: AdapterError | None = None
        for endpoint, adapter in (found,) if single else self._claims(method, path):
            try:
                model = adapter.model_of(endpoint, path, body)
            except AdapterError as refused:
                error = error or refused
                continue
            if model and self._fleet.type_of(model) == adapter.type_name:
                return endpoint, adapter, model
            read.append((endpoint, adapter, model))
        for endpoint, adapter, model in read:
            default = None if model else self._fleet.default_model(adapter)
            if default is not None:
                return endpoint, adapter, default
        named = next((model for _endpoint, _adapter, model in read if model), None)
        if named is None and error is not None:
            raise error
        self._check_models_known(named)
        if named is None:
            raise AdapterError(404, "The request names no model, and no single model is served here.")
        raise AdapterError(404, f"The model `{named}` does not exist.", param="model")

    def _check_models_known(self, named: str | None) -> None:
        """A 503 `no_healthy_backend` (with `Retry-After`) instead of a 404 while some backend has
        not told its models: it may serve `named` once it answers (a client's 404 is final, the
        OpenAI client's `NotFoundError` is never retried)."""
        unknown = len(self._fleet.models_unknown())
        if not unknown:
            return
        what = f"`{named}`" if named else "the request's model"
        reject = Reject(
            503,
            f"No backend serves {what} yet, and {unknown} backend(s) have not said which models "
            "they serve (they do not answer yet); retry later.",
            "no_healthy_backend",
            "model",
        )
        reject.retry_after = self._fleet.models_retry_after_s
        raise reject


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
