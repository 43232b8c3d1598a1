"""`serve_in_thread` serves like a production server on the wire: the sockets it accepts have
TCP_NODELAY set, so an answer written as a head and then a body is not held back by Nagle's
algorithm until the client's delayed ACK (~40 ms per answer on Linux, which every test router and
emulator paid before)."""

from __future__ import annotations

import socket

import httpx

from irmiddleware.testing import serve_in_thread


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
