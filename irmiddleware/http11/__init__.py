"""A small HTTP/1.1 client: `LeanTransport`, an `httpx.AsyncBaseTransport` over asyncio protocols.

The proxy talks plain HTTP/1.1 to a handful of configured backends, so the generality of
httpcore (HTTP/2, proxies, anyio, h11's state machine, a cancel scope around every socket call)
is most of its cost: measured here, httpcore spends ~400 us of CPU per proxied request where this
transport spends a few tens. It keeps `httpx.AsyncClient` as the API: the client still builds
requests and responses; only the bytes on the wire are handled here.

What it does: a keep-alive pool per origin (`scheme, host, port`) with a global connection limit,
a keep-alive limit and expiry; request head and body sent in one write; a response parser for
Content-Length, chunked and read-until-close bodies; a streaming body that yields bytes as they
arrive and gives the connection back to the pool only once the body was read to its end (a body
abandoned halfway closes the connection: a dirty connection is never reused). The four httpx
timeouts (connect, read, write, pool) come from the request's `timeout` extension. Errors are the
httpx exceptions httpcore would raise in the same situation, because the middleware's retry logic
keys on them: a connection that fails before any response byte raises `ConnectError`,
`ConnectTimeout` or `RemoteProtocolError`.

Plain `http://` only; the client mounts it for `http://` so `https://` backends keep httpx's own
transport (and its TLS configuration).

Layers: `_pool` (connections and the keep-alive pool), `_wire` (request and response heads, body
framing, the streamed body), `_transport` (`LeanTransport`). The package knows nothing of the
router: the proxy mounts it under its `httpx.AsyncClient` (`irmiddleware.proxy._upstream`).
"""

from irmiddleware.http11._transport import LeanTransport

__all__ = ["LeanTransport"]
