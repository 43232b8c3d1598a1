"""Load signals from the servers themselves: each adapter reads its emulator's real `/metrics`
(vLLM waiting/running/KV, TGI queue/batch, Triton pending on its own metrics port); the router
scrapes them into the native table, so under `queue_aware` a backend with a long queue of load the
router did not send (clients calling it directly) gets fewer new requests than its idle peers; and
the router's own requests queued at a backend are not counted twice; and a backend that stops
answering scrapes has its signals go stale (ignored), never trusted forever."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import httpx
import pytest
from proxy_support import (
    FAST_FLEET,
    Emulators,
    Routers,
    backend_status,
    config_for,
    wait_idle,
)

from irmiddleware.adapters import TGIAdapter, TritonAdapter, VLLMAdapter
from irmiddleware.testing import (
    TGIConfig,
    TritonConfig,
    TritonModel,
    assert_idle,
    create_tgi_app,
    create_triton_app,
    serve_in_thread,
    wait_until,
)

DIRECT = 8  # requests sent straight to one backend, bypassing the router


@contextlib.contextmanager
def _direct_load(url: str, count: int) -> Iterator[None]:
    """`count` long streaming requests sent straight to `url` from a loop of their own; cancelled
    (the emulator sees the disconnects) when the block ends."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def one(client: httpx.AsyncClient) -> None:
        body = {"model": "m", "prompt": "Hi", "max_tokens": 2000, "stream": True}
        with contextlib.suppress(httpx.HTTPError):
            async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                async for _ in response.aiter_raw():
                    if stop.is_set():
                        return

    async def main() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            tasks = [asyncio.create_task(one(client)) for _ in range(count)]
            await stop.wait()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def test_adapters_read_their_servers_metrics(emulators: Emulators) -> None:
    (vllm,) = emulators(1, max_num_seqs=1, time_per_output_token_s=0.01)
    with _direct_load(vllm.url, 3):
        wait_until(lambda: vllm.emulator.stats.waiting == 2, "two requests waiting on vLLM")
        signals = VLLMAdapter().load_signals(httpx.get(f"{vllm.url}/metrics").text)
        assert signals is not None and signals.queue_depth == 2 and signals.running == 1
        assert signals.kv_usage == 1.0  # the emulator's KV use is running / max_num_seqs
    tgi_app = create_tgi_app(TGIConfig(model_id="m"))
    triton_app = create_triton_app(TritonConfig(models=(TritonModel("simple"),)))
    with serve_in_thread(tgi_app) as tgi, serve_in_thread(triton_app.state.metrics_app) as metrics:
        tgi_signals = TGIAdapter().load_signals(httpx.get(f"{tgi.url}/metrics").text)
        assert tgi_signals is not None and tgi_signals.queue_depth == 0 and tgi_signals.running == 0
        triton_signals = TritonAdapter().load_signals(httpx.get(f"{metrics.url}/metrics").text)
        assert triton_signals is not None and triton_signals.queue_depth == 0
    assert VLLMAdapter().load_signals("# nothing here\n") is None
    assert TritonAdapter().metrics_url("http://10.0.0.5:8000") == "http://10.0.0.5:8002/metrics"


@pytest.mark.slow
def test_queue_aware_avoids_a_backend_loaded_by_others(emulators: Emulators, router: Routers) -> None:
    busy, idle_a, idle_b = emulators(3, max_num_seqs=1, time_per_output_token_s=0.01)
    server = router(config_for([busy.url, idle_a.url, idle_b.url], strategy="queue_aware", **FAST_FLEET))
    with _direct_load(busy.url, DIRECT):
        wait_until(
            lambda: (backend_status(server, busy.url)["signals"] or {}).get("queue_depth") == DIRECT - 1,
            "the router sees the direct queue",
        )
        before = [b.emulator.stats.received for b in (busy, idle_a, idle_b)]
        for _ in range(30):
            body = {"model": "m", "prompt": "Hi", "max_tokens": 1}
            assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).status_code == 200
        routed = [b.emulator.stats.received - n for b, n in zip((busy, idle_a, idle_b), before, strict=True)]
    assert routed[0] < min(routed[1:]), routed  # plain p2c: 21 of 30 here (it sees no load)
    wait_idle(server.app)
    assert_idle(server.app.router)


def test_the_routers_own_queued_requests_are_not_counted_twice(emulators: Emulators, router: Routers) -> None:
    """Requests the router sent are in its own in-flight count already: of a backend's running +
    waiting requests, only the others go to the core as reported load."""
    (backend,) = emulators(1, max_num_seqs=1, time_per_output_token_s=0.01)
    server = router(config_for([backend.url], strategy="queue_aware", **FAST_FLEET))

    def reading() -> tuple[int | None, ...]:
        signals = backend_status(server, backend.url)["signals"] or {}
        return signals.get("queue_depth"), signals.get("running"), signals.get("others")

    # One reading holds all three figures: between two readings a request may end and the next
    # one start, at the backend a moment before the router's own count follows.
    with _direct_load(server.url, 4):  # through the router: 1 running and 3 waiting, all ours
        wait_until(lambda: reading() == (3, 1, 0), "4 at the backend, none of them others'")
        with _direct_load(backend.url, 2):  # two more straight to the backend
            wait_until(lambda: reading() == (5, 1, 2), "6 at the backend, 2 of them others'")
    wait_idle(server.app)
    assert_idle(server.app.router)


@pytest.mark.slow
def test_signals_go_stale_when_scrapes_fail(emulators: Emulators, router: Routers) -> None:
    (backend, other) = emulators(2)
    server = router(config_for([backend.url, other.url], **FAST_FLEET))
    wait_until(lambda: (backend_status(server, backend.url)["signals"] or {}).get("fresh"), "first scrape")
    backend.server.kill()
    wait_until(lambda: not backend_status(server, backend.url)["signals"]["fresh"], "stale after max_age_s")
    metrics = httpx.get(f"{server.url}/metrics").text
    assert f'irm_signal_scrapes_total{{backend="{backend.url}",result="failed"}}' in metrics
    wait_idle(server.app)
    assert_idle(server.app.router)
