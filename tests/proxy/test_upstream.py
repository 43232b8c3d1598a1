"""The proxy's upstream side: the `transport` key picks `LeanTransport` (irmiddleware.http11) or
httpx's own for `http://` backends, the lean send path sends what httpx's would (forwarded headers,
Host, Content-Length), and the shared client never replays one user's cookie for another."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from irmiddleware.http11 import LeanTransport
from irmiddleware.proxy import parse_config
from irmiddleware.proxy._upstream import Upstream, request_headers
from irmiddleware.proxy.config import ConfigError
from tests.http11.http11_support import RawServer, keep_alive, read_request, run_bounded


def test_transport_config_key() -> None:
    backends = [{"url": "http://127.0.0.1:9", "models": ["m"]}]
    assert parse_config({"backends": backends}).transport == "lean"
    assert parse_config({"router": {"transport": "httpx"}, "backends": backends}).transport == "httpx"
    with pytest.raises(ConfigError, match=r"router\.transport"):
        parse_config({"router": {"transport": "h2"}, "backends": backends})


def _config(transport: str) -> Any:
    backends = [{"url": "http://127.0.0.1:9", "models": ["m"]}]
    return parse_config({"router": {"transport": transport}, "backends": backends})


@pytest.mark.parametrize("transport", ["lean", "httpx"])
def test_upstream_uses_the_configured_transport(transport: str) -> None:
    async def scenario() -> None:
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
        upstream = Upstream(_config(transport))
        try:
            async with RawServer(keep_alive(answer, answer)) as server:
                chosen = upstream.client._transport_for_url(httpx.URL(server.url))
                assert isinstance(chosen, LeanTransport) == (transport == "lean")
                response = await upstream.send("GET", httpx.URL(server.url), [], b"")
                assert json.loads(await response.aread()) == {}
                # The client itself (discovery, health checks) shares the same transport.
                assert json.loads((await upstream.client.get(server.url)).content) == {}
                assert server.connections == 1
        finally:
            await upstream.aclose()

    run_bounded(scenario())


@pytest.mark.parametrize("call", ["send", "open"])
@pytest.mark.parametrize("transport", ["lean", "httpx"])
def test_upstream_sends_the_forwarded_headers_host_and_length(transport: str, call: str) -> None:
    """The lean path skips httpx's request building, so it adds Host and Content-Length itself:
    the backend must see what httpx's own path sends (minus httpx's default headers), through
    `send` (an httpx.Response) and through `open` (the relay's `Answer`) alike."""
    requests: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _index: int) -> None:
        for _request in range(3):
            requests.append(await read_request(reader))
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()

    def headers_of(head: bytes) -> dict[bytes, list[bytes]]:
        found: dict[bytes, list[bytes]] = {}
        for line in head.split(b"\r\n")[1:]:
            if line:
                name, _, value = line.partition(b":")
                found.setdefault(name.lower(), []).append(value.strip())
        return found

    async def scenario() -> None:
        upstream = Upstream(_config(transport))
        try:
            async with RawServer(handler) as server:
                url = httpx.URL(server.url + "/v1/completions?x=1")
                forwarded = request_headers(
                    [(b"x-api-key", b"k"), (b"host", b"client"), (b"content-length", b"9")]
                )
                for method, body in (("POST", b'{"a": 1}'), ("POST", b""), ("GET", b"")):
                    if call == "send":
                        await (await upstream.send(method, url, forwarded, body)).aread()
                        continue
                    answer = await upstream.open(method, url, forwarded, body)
                    assert answer.status == 204
                    assert [chunk async for chunk in answer] == []
                    await answer.aclose()
        finally:
            await upstream.aclose()
        port = server.url.rpartition(":")[2].encode()
        for (head, body), (method, sent) in zip(
            requests, [(b"POST", b'{"a": 1}'), (b"POST", b""), (b"GET", b"")], strict=True
        ):
            assert head.startswith(method + b" /v1/completions?x=1 HTTP/1.1\r\n")
            headers = headers_of(head)
            assert headers[b"x-api-key"] == [b"k"]
            assert headers[b"host"] == [b"127.0.0.1:" + port]
            assert headers.get(b"content-length") == (None if method == b"GET" else [str(len(sent)).encode()])
            assert body == sent

    run_bounded(scenario())


@pytest.mark.parametrize("transport", ["lean", "httpx"])
def test_shared_client_never_replays_a_backends_cookie(transport: str) -> None:
    """One user's Set-Cookie must reach that user, and never ride on the next user's request."""
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _index: int) -> None:
        for _request in range(4):
            head, _body = await read_request(reader)
            heads.append(head.lower())
            writer.write(b"HTTP/1.1 200 OK\r\nSet-Cookie: session=alice\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    async def scenario() -> None:
        upstream = Upstream(_config(transport))
        try:
            async with RawServer(handler) as server:
                url = httpx.URL(server.url)
                first = await upstream.send("GET", url, [], b"")
                await first.aread()
                assert first.headers["set-cookie"] == "session=alice"
                await (await upstream.send("GET", url, [], b"")).aread()
                # The client's own requests (discovery, health) keep no cookie either.
                await upstream.client.get(server.url)
                await upstream.client.get(server.url)
                assert [b"cookie:" in head for head in heads] == [False] * 4
        finally:
            await upstream.aclose()

    run_bounded(scenario())
