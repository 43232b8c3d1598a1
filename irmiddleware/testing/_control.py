"""What every emulator adds to its server's own paths, whatever its protocol: stopping work on a
request whose client went away (`AbortOnDisconnect`), and two test-only endpoints
(`control_routes`) that let a test drive an emulator running in another process:

- `GET /_emulator/stats`: the `EmulatorStats` counters as JSON (requests in progress and their
  peak, repeated request ids, completed, aborted...);
- `POST /_emulator/config`: a JSON object of config fields to change (`reconfigure`), e.g.
  `{"fail_status": 503}` or `{"time_per_request_s": 5}`; 400 with the reason when a value is bad.
  `POST /_emulator/reset-peak` starts the peak over.

No real server has these paths (doc/emulators.md), and a router never routes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from irmiddleware.testing._engine import Engine

__all__ = ["AbortOnDisconnect", "control_routes"]


class AbortOnDisconnect:
    """Cancels the handling of a request whose client goes away, streamed or not, the moment the
    server learns of it, as vLLM does (`with_cancellation` on its API routes, and its engine's
    abort): the engine's step loop ends there, and its slot is free.

    Starlette alone notices only when writing a stream; a non-streaming handler would run to the
    end for nobody. This reads the request's body for the app, then listens for the disconnect."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body_read = asyncio.Event()
        gone = asyncio.Event()
        finished = False

        async def app_receive() -> Message:
            if not body_read.is_set():
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                elif not message.get("more_body", False):
                    body_read.set()
                return message
            await gone.wait()  # after the body, only a disconnect can come
            return {"type": "http.disconnect"}

        async def app_send(message: Message) -> None:
            nonlocal finished
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        handling = asyncio.ensure_future(self.app(scope, app_receive, app_send))
        listener = asyncio.create_task(_listen(receive, body_read, gone))
        try:
            await asyncio.wait((handling, listener), return_when=asyncio.FIRST_COMPLETED)
            if gone.is_set() and not finished:
                handling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handling
        finally:
            listener.cancel()
            if not handling.done():
                handling.cancel()


async def _listen(receive: Receive, body_read: asyncio.Event, gone: asyncio.Event) -> None:
    await body_read.wait()
    message = await receive()
    if message["type"] == "http.disconnect":
        gone.set()


def control_routes(emulator: Engine[Any, Any]) -> list[Route]:
    """The test-only routes of the module docstring, for `emulator`."""

    async def stats(request: Request) -> Response:
        return JSONResponse(dataclasses.asdict(emulator.stats))

    async def configure(request: Request) -> Response:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise TypeError("expected a JSON object of config fields")
            emulator.reconfigure(**changes)
        except (TypeError, ValueError) as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return JSONResponse({"changed": sorted(changes)})

    async def reset_peak(request: Request) -> Response:
        emulator.reset_peak()
        return JSONResponse(dataclasses.asdict(emulator.stats))

    return [
        Route("/_emulator/stats", stats, methods=["GET"]),
        Route("/_emulator/config", configure, methods=["POST"]),
        Route("/_emulator/reset-peak", reset_peak, methods=["POST"]),
    ]
