"""A small HTTP/1.1 client: `LeanTransport`, an `httpx.AsyncBaseTransport` over asyncio protocols.

The proxy talks plain HTTP/1.1 to a handful of configured backends, so the generality of
httpcore (HTTP/2, proxies, anyio, h11's state machine, a cancel scope around every socket call)
is most of its cost: measured here, httpcore spends ~400 us of CPU per proxied request where this
transport spends a few tens. It keeps `httpx.AsyncClient` as the API: the client still builds
requests and responses; only the bytes on the wire are handled here. A caller that wants neither
(the proxy's data plane) calls `LeanTransport.open` and gets a `StreamedResponse`: status, raw
headers and the streamed body, without an `httpx.Request` or `httpx.Response` built around them.

What it does: a keep-alive pool per origin (`scheme, host, port`) with a global connection limit,
a keep-alive limit and an expiry below the backends' idle timeout (`KEEPALIVE_EXPIRY_S`); request
head and body sent in one write; responses parsed by llhttp (`httptools`, a core dependency) with
Content-Length, chunked and read-until-close bodies; a streaming body that yields bytes as they
arrive and gives the connection back to the pool only once the body was read to its end (a body
abandoned halfway, or any error, closes the connection: a dirty connection is never reused). The
four httpx timeouts (connect, read, write, pool) come from the request's `timeout` extension.

Each request is written at most once. A pooled connection is checked alive just before the write
(the socket asked for EOF or stray bytes); one found dead is replaced then, before anything was
written to it. A connection that ends after the write and before any response byte raises
`ResetAfterWrite`: the backend may be working on the request, so the transport does not send it
again; the caller decides. The retry rules are in doc/proxy.md ("Upstream transport: what may be
retried").
Other errors are the httpx exceptions httpcore would raise in the same situation: `ConnectError`
or `ConnectTimeout` before the write, `RemoteProtocolError` for a malformed or truncated answer,
`ReadError` for a reset mid-body, `ReadTimeout`, `WriteTimeout`, `PoolTimeout`.

Plain `http://` only; the client mounts it for `http://` so `https://` backends keep httpx's own
transport (and its TLS configuration).

Layers: `_pool` (connections and the keep-alive pool), `_wire` (request and response heads, body
framing, the streamed body), `_transport` (`LeanTransport`). The package knows nothing of the
router: the proxy mounts it under its `httpx.AsyncClient` (`irmiddleware.proxy._upstream`).
"""

from irmiddleware.http11._pool import PoolStats
from irmiddleware.http11._transport import KEEPALIVE_EXPIRY_S, LeanTransport
from irmiddleware.http11._wire import ResetAfterWrite, StreamedResponse

__all__ = ["KEEPALIVE_EXPIRY_S", "LeanTransport", "PoolStats", "ResetAfterWrite", "StreamedResponse"]
