"""The admin app: metrics, status and the admin API, served on a listener of their own.

`irmiddleware serve` runs it on `[admin] listen`; a drop-in user mounts
`RoutingMiddleware.admin_app` on a private port. Nothing here is reachable on the traffic port.

    GET    /admin/backends                 every backend with its state (`drained` once a drain is done)
    POST   /admin/backends                 add one: {"url", "type", "capacity", "weight", "models"}
    POST   /admin/backends/{id}/drain      no new requests; those in flight finish
    POST   /admin/backends/{id}/undrain    back to the state its health gives it
    PATCH  /admin/backends/{id}            {"capacity", "weight"}
    DELETE /admin/backends/{id}            remove a drained backend (409 before)

Mutating calls need `Authorization: Bearer TOKEN`, the token read from `[admin] token_file` or
`token_env` at each call and compared in constant time; reads too with `protect_reads`. Missing:
401 with `WWW-Authenticate: Bearer`; wrong: 403; no token configured: 403 saying how to set one.
A refusal is logged at warning, without the token.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from typing import TYPE_CHECKING, Any, Final

from irmiddleware.proxy._exchange import JSON_HEADERS, Message, Receive, Scope, Send, respond
from irmiddleware.proxy._fleet import FleetChangeRefused
from irmiddleware.proxy._routes import not_found
from irmiddleware.proxy.config import AdminConfig, ConfigError, parse_backend

if TYPE_CHECKING:
    from irmiddleware.proxy._middleware import RoutingMiddleware

__all__ = ["AdminApp", "AdminAuth"]

log = logging.getLogger("irmiddleware.proxy.admin")

_PREFIX: Final = "/admin/backends"
_BODY_MAX: Final = 64 * 1024
_READS: Final = frozenset(("GET", "HEAD"))


class AdminAuth:
    """Where the admin token comes from, and the check of a request's bearer token."""

    def __init__(self, config: AdminConfig) -> None:
        self._file, self._env = config.token_file, config.token_env
        self.protect_reads = config.protect_reads

    def check_source(self) -> None:
        """ConfigError unless the configured token can be read now and is not empty (at startup:
        a typo in a path fails the start, not the first admin call)."""
        if not (self._file or self._env):
            return
        token, problem = self._read()
        if token is None:
            raise ConfigError(f"`admin.{'token_env' if self._env else 'token_file'}`: {problem}")

    def token(self) -> str | None:
        """The configured token, read now; None (logged) when none is configured or it cannot be
        read."""
        token, problem = self._read()
        if problem is not None:
            log.error("no admin token: %s", problem)
        return token

    def _read(self) -> tuple[str | None, str | None]:
        """(token, None), or (None, why there is none)."""
        if self._env:
            token = os.environ.get(self._env, "").strip()
            unset = f"the environment variable {self._env} is not set or empty"
            return (token, None) if token else (None, unset)
        if not self._file:
            return None, None
        try:
            with open(self._file, encoding="utf-8") as file:
                token = file.read().strip()
        except OSError as error:
            return None, f"cannot read the token file {self._file}: {error.strerror}"
        return (token, None) if token else (None, f"the token file {self._file} is empty")

    def refusal(self, scope: Scope) -> tuple[int, str] | None:
        """(status, message) when the request may not go on; None when it may."""
        mutating = scope["method"] not in _READS
        if not mutating and not self.protect_reads:
            return None
        expected = self.token()
        if expected is None:
            return 403, (
                "No admin token is configured: set `token_file` or `token_env` in [admin] "
                "(doc/proxy.md, Admin listener)."
            )
        given = _bearer(scope)
        if given is None:
            return 401, "This call needs `Authorization: Bearer <token>`."
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return 403, "The admin token is wrong."
        return None


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class AdminApp:
    """The ASGI app of the admin listener (module docstring), over one `RoutingMiddleware`."""

    def __init__(self, middleware: RoutingMiddleware) -> None:
        self.middleware = middleware
        self.auth = AdminAuth(middleware.config.admin)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            # The router's own lifespan runs on the traffic side: the admin app has nothing to
            # start, and answers a lifespan as the standalone router's 404 app does.
            await not_found(scope, receive, send)
            return
        refused = self.auth.refusal(scope)
        if refused is not None:
            status, message = refused
            client = scope.get("client") or ("?", 0)
            log.warning(
                "admin %s %s from %s refused (%d): %s",
                scope["method"],
                scope["path"],
                client[0],
                status,
                message,
            )
            headers = ((b"www-authenticate", b"Bearer"),) if status == 401 else ()
            await _error(send, status, message, headers)
            return
        path, method = scope["path"], scope["method"]
        if path == _PREFIX or path.startswith(_PREFIX + "/"):
            await self._api(scope, receive, send)
        elif not await self.middleware.responder.answer(path, method, send):
            await _error(send, 404, f"No admin route for {path}.")

    async def _api(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await _read_json(receive) if scope["method"] in ("POST", "PATCH") else {}
            status, answer = await self._call(scope["method"], scope["path"], body)
        except FleetChangeRefused as refused:
            status, answer = refused.status, {"error": refused.message}
        except ValueError as error:  # ConfigError, an unknown backend type (PluginError)
            status, answer = 400, {"error": str(error)}
        except Exception:
            log.exception("admin %s %s failed", scope["method"], scope["path"])
            status, answer = 500, {"error": "internal error; see the router's log"}
        if status >= 400:
            log.warning("admin %s %s: %d %s", scope["method"], scope["path"], status, answer["error"])
        await respond(send, status, json.dumps(answer).encode(), JSON_HEADERS)

    async def _call(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        parts = path[len(_PREFIX) :].strip("/").split("/") if path != _PREFIX else []
        if not parts:
            if method == "GET":
                return 200, {"backends": backend_views(self.middleware)}
            if method == "POST":
                backend_id = await self.middleware.add_backend(parse_backend(body, "backend"))
                return 201, self._view(backend_id)
            return _not_allowed(method, "GET, POST")
        backend_id = _backend_id(parts[0])
        if backend_id not in self.middleware.fleet.backends:
            raise FleetChangeRefused(404, f"no backend {parts[0]}")
        if len(parts) == 2 and parts[1] in ("drain", "undrain"):
            if method != "POST":
                return _not_allowed(method, "POST")
            (self.middleware.drain if parts[1] == "drain" else self.middleware.undrain)(backend_id)
            return 200, self._view(backend_id)
        if len(parts) != 1:
            raise FleetChangeRefused(404, f"no admin route for {path}")
        if method == "GET":
            return 200, self._view(backend_id)
        if method == "PATCH":
            capacity, weight = _capacity_weight(body)
            self.middleware.update_backend(backend_id, capacity=capacity, weight=weight)
            return 200, self._view(backend_id)
        if method == "DELETE":
            self.middleware.remove_backend(backend_id)
            return 200, {"removed": backend_id}
        return _not_allowed(method, "GET, PATCH, DELETE")

    def _view(self, backend_id: int) -> dict[str, Any]:
        return next(b for b in backend_views(self.middleware) if b["id"] == backend_id)


def backend_views(middleware: RoutingMiddleware) -> list[dict[str, Any]]:
    """The status document's backends, with `drained` for a drain that has nothing left in flight."""
    views = middleware.status()["backends"]
    for view in views:
        if view["state"] == "draining" and not view["load"] and not view["requests_in_flight"]:
            view["state"] = "drained"
    return list(views)


def _capacity_weight(body: dict[str, Any]) -> tuple[int | None, float | None]:
    """The `capacity` and `weight` of a PATCH, checked as the configuration checks them."""
    unknown = sorted(set(body) - {"capacity", "weight"})
    if unknown:
        raise ConfigError(f"unknown key `{unknown[0]}`; valid keys: capacity, weight")
    if not body:
        raise ConfigError("give `capacity` and/or `weight`")
    checked = parse_backend({"url": "http://checked:1", **body}, "backend")
    return (
        checked.capacity if "capacity" in body else None,
        checked.weight if "weight" in body else None,
    )


def _backend_id(text: str) -> int:
    if not text.isdigit():
        raise FleetChangeRefused(404, f"no backend {text!r} (ids are numbers)")
    return int(text)


def _not_allowed(method: str, allowed: str) -> tuple[int, dict[str, Any]]:
    return 405, {"error": f"{method} is not allowed here; use {allowed}"}


async def _read_json(receive: Receive) -> dict[str, Any]:
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _BODY_MAX:
            raise ConfigError(f"the request body is larger than {_BODY_MAX} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    try:
        body = json.loads(b"".join(chunks) or b"{}")
    except (ValueError, RecursionError):
        raise ConfigError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise ConfigError("the request body must be a JSON object")
    return body


async def _error(
    send: Send, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    body = json.dumps({"error": message}).encode()
    await respond(send, status, body, (*JSON_HEADERS, *headers))
