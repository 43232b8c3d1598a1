"""The upstream side: one shared `httpx.AsyncClient`, the proxy's send path, header filtering.

The client is created once (lifespan startup) and closed at shutdown; every request reuses its
connection pool. Timeouts and pool limits are explicit because httpx's 5 s default would cut LLM
generations and streams short.

`Upstream.open` is the data plane's one call. For `http://` backends under the lean transport it
hands the request's bytes straight to the client's mounted `LeanTransport` (`LeanTransport.open`)
instead of going through `AsyncClient.send`: the client's auth, redirect and cookie layers do
nothing for a proxy that follows no redirects and keeps no cookies, and together with
`build_request`'s header merging they cost ~140 us of CPU per request (`irmiddleware
bench-proxy`: ~500 -> ~360 us); the `httpx.Request` and `httpx.Response` built around each
exchange cost tens more. What the client would have added that matters is added here: its
timeouts, Host and Content-Length. The answer is an `Answer`: status, raw headers, the body's
bytes as they arrive.
Everything else (https backends, `--transport httpx`, discovery) goes through `AsyncClient.send`,
its `httpx.Response` seen through the same `Answer` shape. `Upstream.send` is the same request
with an `httpx.Response` for an answer.
"""

from __future__ import annotations

import functools
import http.cookiejar
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any, Final, Protocol

import httpx

from irmiddleware.http11 import LeanTransport
from irmiddleware.proxy._tls import tls_context
from irmiddleware.proxy.config import RouterConfig

__all__ = [
    "HOP_BY_HOP",
    "Answer",
    "Upstream",
    "create_client",
    "parsed_url",
    "request_headers",
    "response_headers",
]

# RFC 9110 §7.6.1 connection-specific headers, plus those the proxy recomputes itself.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Not passed back: the ASGI server in front of the client writes its own Date and Server headers,
# and two of each would confuse clients; the router adds the request's X-Request-ID itself (a
# backend that echoes it would send it a second time).
_NOT_PASSED_BACK: Final = HOP_BY_HOP | {b"date", b"server", b"x-request-id"}
# Not forwarded upstream: httpx sets Host for the backend and Content-Length for the body it sends.
_NOT_FORWARDED_UP: Final = HOP_BY_HOP | {b"host", b"content-length"}


class _NoCookieJar(http.cookiejar.CookieJar):
    """Stores nothing. The client is shared by every user of the proxy: httpx's default jar would
    keep one user's `Set-Cookie` from a backend and send it upstream with everyone's next request.
    (Set-Cookie itself still reaches the client in the relayed headers.)"""

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        pass


def create_client(config: RouterConfig, lean: LeanTransport | None = None) -> httpx.AsyncClient:
    """The shared client. `trust_env=False` so no proxy variable can send traffic anywhere but the
    configured backends; no redirects for the same reason. `lean` is mounted for `http://`."""
    timeouts = config.timeouts
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=timeouts.connect_s, read=timeouts.read_s, write=timeouts.write_s, pool=timeouts.pool_s
        ),
        limits=_limits(config),
        mounts=None if lean is None else {"http://": lean},
        cookies=_NoCookieJar(),
        follow_redirects=False,
        trust_env=False,
        verify=tls_context(),  # one per process: a client's own would parse the CA bundle again
    )


def _limits(config: RouterConfig) -> httpx.Limits:
    return httpx.Limits(
        max_connections=config.limits.max_connections,
        max_keepalive_connections=config.limits.max_keepalive_connections,
        keepalive_expiry=config.limits.keepalive_expiry_s,
    )


class Answer(Protocol):
    """A backend's answer as the relay reads it (`Upstream.open`): the final status, the raw
    headers (names as the backend sent them), and the body's bytes as they arrive (iterate once,
    then `aclose`, which closes a connection whose body was not read to its end)."""

    status: int
    headers: list[tuple[bytes, bytes]]

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class _HttpxAnswer:
    """An `httpx.Response` (httpx's own transport: https, `--transport httpx`) as an `Answer`."""

    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers: list[tuple[bytes, bytes]] = response.headers.raw

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._response.aiter_raw()

    async def aclose(self) -> None:
        await self._response.aclose()


class Upstream:
    """The shared client and the proxy's send path (see the module docstring). `aclose` closes
    the client, which closes the mounted transport and its connections."""

    def __init__(self, config: RouterConfig) -> None:
        # `lean` serves http:// backends (most of the per-request CPU was httpcore's); https://
        # ones keep httpx's transport and its TLS setup.
        self._lean = (
            LeanTransport(_limits(config), config.limits.keepalive_expiry_s)
            if config.transport == "lean"
            else None
        )
        self.client = create_client(config, self._lean)
        # The client's timeouts, as `AsyncClient.build_request` would give them to the transport.
        self._timeouts: Final = self.client.timeout.as_dict()

    def open(
        self, method: str, url: httpx.URL, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Awaitable[Answer]:
        """Sends one request (await it); the answer's body is not read yet (iterate over it, then
        `aclose`). `headers` are the ones to forward, without Host and Content-Length
        (`request_headers`)."""
        if self._lean is not None and url.scheme == "http":
            return self._lean.open(method, url, headers, body, self._timeouts)  # adds the two
        return self._open_httpx(method, url, headers, body)

    async def _open_httpx(
        self, method: str, url: httpx.URL, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Answer:
        return _HttpxAnswer(await self._send_httpx(method, url, headers, body))

    async def send(
        self, method: str, url: httpx.URL, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> httpx.Response:
        """`open`, with an `httpx.Response` for the answer (stream it, then `aclose`)."""
        if self._lean is not None and url.scheme == "http":
            return await self._lean.send_bytes(method, url, headers, body, self._timeouts)  # adds the two
        return await self._send_httpx(method, url, headers, body)

    async def _send_httpx(
        self, method: str, url: httpx.URL, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> httpx.Response:
        client = self.client
        return await client.send(
            client.build_request(method, url, headers=headers, content=body), stream=True
        )

    async def aclose(self) -> None:
        await self.client.aclose()


@functools.lru_cache(maxsize=1024)
def parsed_url(url: str) -> httpx.URL:
    """`url` parsed once: a routed URL (backend + path) repeats on every request, and httpx
    parsing it again cost ~11 us of the proxy's per-request CPU. httpx.URL is immutable."""
    return httpx.URL(url)


def request_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The client's headers to forward upstream (hop-by-hop, Host and Content-Length removed)."""
    return [(name, value) for name, value in raw if name.lower() not in _NOT_FORWARDED_UP]


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The backend's headers to pass to the client: all but hop-by-hop ones (and Date/Server, which
    the ASGI server sets). Content-Length and Content-Encoding stay, because the body is relayed
    raw (neither decoded nor re-chunked)."""
    return [(name, value) for name, value in raw if name.lower() not in _NOT_PASSED_BACK]
