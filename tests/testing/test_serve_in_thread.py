"""`serve_in_thread` serves like a production server on the wire: the sockets it accepts have
TCP_NODELAY set, so an answer written as a head and then a body is not held back by Nagle's
algorithm until the client's delayed ACK (~40 ms per answer on Linux, which every test router and
emulator paid before). Stopping it is graceful, like uvicorn's own shutdown: it stops listening at
once, lets the response in flight finish, and only then runs the app's lifespan shutdown."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import httpx

from irmiddleware.testing import serve_in_thread, wait_until


def test_accepted_connections_have_tcp_nodelay() -> None:
    flags: list[int] = []

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        # Read on the server's loop, while the connection that carries this request is open.
        for connection in server._server.server_state.connections:  # uvicorn's, no public accessor
            sock = connection.transport.get_extra_info("socket")
            flags.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    with serve_in_thread(app) as server:
        assert httpx.get(server.url).text == "ok"
    assert flags and all(flags), flags


def _refuses_connections(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_stop_lets_the_response_in_flight_finish_before_the_lifespan_shutdown() -> None:
    events: list[str] = []
    release = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                events.append(message["type"])
                await send({"type": "lifespan.startup.complete"})
            events.append(message["type"])
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first ", "more_body": True})
        await asyncio.to_thread(release.wait, 10)
        await send({"type": "http.response.body", "body": b"last"})
        events.append("response done")

    with serve_in_thread(app, lifespan=True) as server:
        with httpx.stream("GET", server.url, timeout=10) as response:
            chunks = response.iter_raw()
            body = next(chunks)
            stopping = threading.Thread(target=server.stop)
            stopping.start()
            wait_until(lambda: _refuses_connections(server.port), "the stopping server refuses connections")
            release.set()
            body += b"".join(chunks)
        stopping.join(10)
    assert body == b"first last"
    assert events == ["lifespan.startup", "response done", "lifespan.shutdown"]
