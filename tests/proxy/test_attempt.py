"""One `Attempt` built from an explicit `AttemptContext`, without a middleware: against a real vLLM
emulator it relays the answer and releases its lease exactly once, and tells the health observer,
admission and the plugin observers once each; against a closed port it asks for a retry without a
byte to the client; an exception inside it still releases exactly once."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
from proxy_support import Emulators, config_for

from irmiddleware import _plugins
from irmiddleware.hooks import RouteInfo
from irmiddleware.proxy._attempt import Attempt, AttemptContext, Releases
from irmiddleware.proxy._exchange import ClientExchange, Message
from irmiddleware.proxy._fleet import Fleet
from irmiddleware.proxy._metrics import RouterMetrics
from irmiddleware.proxy._upstream import Upstream
from irmiddleware.proxy.config import RouterConfig

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}).encode()


class Recorded:
    """An attempt context whose callbacks record what they were told; closing it frees the
    fleet's table."""

    def __init__(self, config: RouterConfig) -> None:
        manager, broken = _plugins.load_plugins()
        self.metrics = RouterMetrics(lambda: [])
        self.fleet = Fleet(config, _plugins.collect(manager, broken), self.metrics)
        self.observed: list[tuple[int, str, int | None]] = []
        self.released: list[int] = []
        self.steps: list[str] = []
        self.sent: list[Message] = []
        self.upstream = Upstream(config)
        self.context = AttemptContext(
            upstream=self.upstream,
            fleet=self.fleet,
            observe=lambda backend, outcome, status: self.observed.append((backend.id, outcome, status)),
            metrics=self.metrics,
            notify=lambda step, attempt, status=None, error=None: self.steps.append(step),
            retries=config.retries,
            releases=Releases(0.0, self.released.append),
        )

    def __enter__(self) -> Recorded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fleet.router.close()

    def exchange(self) -> ClientExchange:
        scope: dict[str, Any] = {
            "method": "POST",
            "path": "/v1/chat/completions",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json")],
        }

        async def receive() -> Message:
            await asyncio.Event().wait()  # the client never hangs up
            raise AssertionError

        async def send(message: Message) -> None:
            self.sent.append(message)

        backend = next(iter(self.fleet.backends.values()))
        exchange = ClientExchange(scope, receive, send, backend.adapter, 1)
        exchange.body, exchange.route = BODY, RouteInfo("/v1/chat/completions", "m")
        return exchange

    def counts(self) -> tuple[int, int, int]:
        """(in flight, completed, failed) summed over the fleet's backends."""
        stats = self.fleet.router.stats()
        return (
            sum(s.requests_in_flight for s in stats),
            sum(s.completed for s in stats),
            sum(s.failed for s in stats),
        )


async def _attempt(recorded: Recorded, exchange: ClientExchange) -> tuple[Attempt, bool]:
    lease = recorded.fleet.acquire(exchange.route)
    assert lease is not None and recorded.counts()[0] == 1
    try:
        async with Attempt(recorded.context, exchange, lease, 1, []) as attempt:
            retry = await attempt.run()
    finally:
        await recorded.upstream.aclose()
    return attempt, retry


def test_an_attempt_relays_and_releases_once(emulators: Emulators) -> None:
    (backend,) = emulators(1)
    with Recorded(config_for([backend.url])) as recorded:
        exchange = recorded.exchange()
        attempt, retry = asyncio.run(_attempt(recorded, exchange))
        assert not retry and attempt.outcome == exchange.outcome == "ok" and attempt.status == 200
        assert recorded.sent[0]["type"] == "http.response.start" and recorded.sent[0]["status"] == 200
        body = b"".join(m.get("body", b"") for m in recorded.sent[1:])
        assert json.loads(body)["object"] == "chat.completion"
        assert recorded.sent[-1]["more_body"] is False and exchange.started and exchange.done
        assert recorded.counts() == (0, 1, 0)  # released exactly once, as a success
        assert recorded.observed == [(0, "ok", 200)] and recorded.released == [0]
        assert recorded.steps == ["routed", "first_byte", "completed"]
        assert backend.emulator.stats.received == 1


def test_an_unreachable_backend_asks_for_a_retry_and_sends_nothing() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Recorded(config_for([f"http://127.0.0.1:{port}"])) as recorded:
        exchange = recorded.exchange()
        attempt, retry = asyncio.run(_attempt(recorded, exchange))
        assert retry and attempt.outcome == exchange.outcome == "connect_error"
        assert recorded.sent == [] and not exchange.started
        assert recorded.counts() == (0, 0, 1)  # released exactly once, as a failure
        assert recorded.observed == [(0, "connect_error", None)] and recorded.released == [0]
        assert recorded.steps == ["routed", "failed"]


def test_an_exception_inside_still_releases_once(emulators: Emulators) -> None:
    (backend,) = emulators(1)
    with Recorded(config_for([backend.url])) as recorded:
        exchange = recorded.exchange()

        async def broken_send(message: Message) -> None:
            raise RuntimeError("the ASGI server failed")

        exchange.send = broken_send
        with pytest.raises(RuntimeError):
            asyncio.run(_attempt(recorded, exchange))
        assert exchange.outcome == "internal" and recorded.counts() == (0, 0, 1)
        assert recorded.observed == [(0, "internal", 200)] and recorded.released == [0]
        assert recorded.steps == ["routed", "first_byte", "failed"]
