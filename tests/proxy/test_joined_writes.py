"""`serve` writes a response head together with what follows it (one system call, one segment),
and never holds a head past the event loop's next turn: a stream's head reaches the client before
its first event does, and an interim "100 Continue" is never held at all."""

from __future__ import annotations

import asyncio
from typing import Any

from irmiddleware.proxy._server import _JoinedWrites


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return name


def test_a_head_and_its_body_go_out_in_one_write() -> None:
    async def main() -> list[bytes]:
        transport = _Transport()
        joined = _JoinedWrites(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        joined.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        joined.write(b"{}")
        await asyncio.sleep(0)
        return transport.writes

    assert asyncio.run(main()) == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]


def test_a_head_alone_goes_out_on_the_next_turn_of_the_loop() -> None:
    async def main() -> tuple[list[bytes], list[bytes]]:
        transport = _Transport()
        joined = _JoinedWrites(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        joined.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        before = list(transport.writes)
        await asyncio.sleep(0)
        return before, transport.writes

    before, after = asyncio.run(main())
    assert before == [] and after == [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"]


def test_continue_is_never_held_and_close_sends_a_held_head_first() -> None:
    async def main() -> _Transport:
        transport = _Transport()
        joined = _JoinedWrites(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        joined.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
        joined.write(b"HTTP/1.1 413 Content Too Large\r\nconnection: close\r\n\r\n")
        joined.close()
        assert joined.get_extra_info("peername") == "peername"  # the rest is the transport's
        await asyncio.sleep(0)
        return transport

    transport = asyncio.run(main())
    assert transport.closed
    assert transport.writes == [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 413 Content Too Large\r\nconnection: close\r\n\r\n",
    ]
