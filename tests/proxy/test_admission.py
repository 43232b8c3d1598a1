"""Admission control end to end, with real uvicorn servers on 127.0.0.1 and vLLM emulators whose
per-token time makes requests hold capacity: under mixed-class saturation no urgent request is shed
while less urgent ones get in; waiters are served by class, then arrival; queue bounds, eviction and
wait timeouts hold and answer 503 + Retry-After in OpenAI's error shape; a waiter whose client hangs
up leaves the queue at once; tenant limits answer 429; the router's /metrics and status endpoint
answer while 2000 requests are queued or shed (their answers report the queue); waiters are served
as soon as capacity appears without a release (the only backend recovering from failed health
checks, a drain ending, a larger capacity), none timing out; and every in-flight and queue counter is
back to zero at the end."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from proxy_support import (
    FAST_FLEET,
    Emulator,
    Emulators,
    Routers,
    RouterServer,
    backend_status,
    held_stream,
    wait_idle,
)

from irmiddleware.proxy import RoutingMiddleware, parse_config
from irmiddleware.testing import assert_idle, wait_until

ALL_SHARES = [1.0] * 8  # classes then differ only in queue order, not in what they may fill


def config_of(
    backends: list[Emulator], capacity: int, fleet: dict[str, Any] | None = None, **admission: Any
) -> Any:
    entries = [{"url": b.url, "capacity": capacity, "models": ["m"]} for b in backends]
    router = {"retry_after_s": 2, **(fleet or {})}
    return parse_config({"router": router, "backends": entries, "admission": admission})


def post(url: str, priority: int, tokens: int = 4, tag: str = "", timeout: float = 30) -> httpx.Response:
    body = {"model": "m", "prompt": f"Hi {tag}", "max_tokens": tokens, "ignore_eos": True}
    headers = {"x-irm-priority": str(priority)}
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=timeout)


@contextlib.contextmanager
def holding(url: str, tokens: int = 400) -> Iterator[None]:
    """Holds one slot with a class-0 stream until the block ends (then hangs up)."""
    body = {"model": "m", "prompt": "hold", "max_tokens": tokens, "ignore_eos": True, "stream": True}
    with held_stream(url, "/v1/completions", body):
        yield


def samples(url: str, name: str) -> dict[tuple[str, ...], float]:
    found: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value  # type: ignore[arg-type]
    return found


def assert_all_idle(server: RouterServer) -> None:
    app: RoutingMiddleware = server.app
    wait_idle(app)
    assert_idle(app.router)
    assert app.admission.queue.total == 0 and app.admission.queue.waiting == [0] * 8
    assert set(samples(server.url, "irm_admission_queue_length").values()) == {0.0}


@pytest.mark.slow
def test_urgent_requests_are_not_shed_while_others_get_in(emulators: Emulators, router: Routers) -> None:
    backends = emulators(2, max_num_seqs=2, time_per_output_token_s=0.02)
    server = router(
        config_of(backends, 2, max_queue=12, aging_s=0, classes={"6": {"max_wait_s": 0.3}}, max_wait_s=20)
    )
    classes = [0 if i % 4 == 0 else 6 for i in range(48)]  # 12 urgent, 36 batch, interleaved
    with ThreadPoolExecutor(max_workers=48) as pool:
        futures = [pool.submit(post, server.url, c, 5, str(i)) for i, c in enumerate(classes)]
        answers = [(c, f.result(timeout=60)) for c, f in zip(classes, futures, strict=True)]
    urgent = [r.status_code for c, r in answers if c == 0]
    batch = [r.status_code for c, r in answers if c == 6]
    assert urgent == [200] * 12
    assert 200 in batch and 503 in batch  # batch traffic was admitted and shed
    refused = next(r for c, r in answers if r.status_code == 503)
    assert refused.headers["retry-after"] == "2"
    assert (
        refused.json()["error"]["type"] == "ServiceUnavailableError"
        and refused.json()["error"]["code"] == 503
    )
    shed = samples(server.url, "irm_admission_shed_total")
    assert not any(dict(labels)["class"] == "0" for labels in shed)
    assert sum(shed.values()) == batch.count(503)
    assert_all_idle(server)


@pytest.mark.slow
def test_waiters_are_served_by_class_then_arrival(emulators: Emulators, router: Routers) -> None:
    (backend,) = emulators(1, max_num_seqs=1, time_per_output_token_s=0.01)
    server = router(config_of([backend], 1, max_queue=10, aging_s=0, class_shares=ALL_SHARES))
    queue = server.app.admission.queue
    arrivals = [("a", 3), ("b", 1), ("c", 3), ("d", 0), ("e", 7), ("f", 1)]
    finished: list[str] = []

    def send(tag: str, priority: int) -> None:
        assert post(server.url, priority, 3, tag).status_code == 200
        finished.append(tag)  # list.append is atomic; capacity 1 serves one at a time

    with ThreadPoolExecutor(max_workers=len(arrivals)) as pool, holding(server.url):
        futures = []
        for count, (tag, priority) in enumerate(arrivals, start=1):
            futures.append(pool.submit(send, tag, priority))
            wait_until(lambda count=count: queue.total == count)  # queued in this arrival order
    for future in futures:
        future.result(timeout=30)
    assert finished == ["d", "b", "f", "a", "c", "e"]
    assert_all_idle(server)


@pytest.mark.slow
def test_queue_bound_eviction_and_timeout(emulators: Emulators, router: Routers) -> None:
    (backend,) = emulators(1, max_num_seqs=1, time_per_output_token_s=0.01)
    server = router(config_of([backend], 1, max_queue=3, max_wait_s=2.0, aging_s=0, class_shares=ALL_SHARES))
    queue = server.app.admission.queue
    answered: list[tuple[str, int]] = []  # in the order the answers came (list.append is atomic)

    def send(tag: str, priority: int) -> None:
        answered.append((tag, post(server.url, priority, 2, tag).status_code))

    def tags() -> list[str]:
        return [tag for tag, _ in answered]

    with ThreadPoolExecutor(max_workers=8) as pool, holding(server.url, tokens=2000):
        futures = []
        for count in range(1, 4):  # one at a time, so low2 is the newest
            futures.append(pool.submit(send, f"low{count - 1}", 5))
            wait_until(lambda count=count: queue.total == count)
        futures.append(pool.submit(send, "late-low", 5))  # queue full of class 5: refused
        wait_until(lambda: "late-low" in tags())
        futures.append(pool.submit(send, "urgent", 1))  # evicts the newest class-5 waiter
        wait_until(lambda: "low2" in tags())
        # Refused and evicted while the three first arrivals (or their replacement) still wait.
        assert tags() == ["late-low", "low2"] and queue.total == 3 and max(queue.waiting) <= 3
        for future in futures:
            future.result(timeout=10)  # the holder keeps the slot: everyone left times out
        still_held = backend.emulator.stats.received == 1  # only the holder reached the backend
    assert still_held and dict(answered) == dict.fromkeys(("late-low", "low2", "low0", "low1", "urgent"), 503)
    shed = {
        (dict(k)["class"], dict(k)["reason"]): v
        for k, v in samples(server.url, "irm_admission_shed_total").items()
    }
    assert shed == {("5", "queue_full"): 1, ("5", "evicted"): 1, ("5", "timeout"): 2, ("1", "timeout"): 1}
    # late-low was refused without waiting: only the three that entered the queue (and urgent)
    # are in the wait histogram.
    waits = {dict(k)["class"]: v for k, v in samples(server.url, "irm_admission_wait_seconds_count").items()}
    assert waits == {"5": 3, "1": 1}
    assert_all_idle(server)


@pytest.mark.slow
def test_a_disconnecting_waiter_leaves_at_once(emulators: Emulators, router: Routers) -> None:
    (backend,) = emulators(1, max_num_seqs=1, time_per_output_token_s=0.01)
    server = router(config_of([backend], 1, max_queue=1, max_wait_s=30))
    queue = server.app.admission.queue
    with ThreadPoolExecutor(max_workers=1) as pool, holding(server.url):
        gone = pool.submit(post, server.url, 0, 2, "gone", 0.5)  # the client gives up after 0.5 s
        wait_until(lambda: queue.total == 1)
        wait_until(lambda: queue.total == 0)  # while the slot is still held: it left, unserved
        assert isinstance(gone.exception(timeout=5), httpx.TimeoutException)
        # Not shed (a 30 s max_wait has not passed) and never served: abandoned.
        assert samples(server.url, "irm_admission_shed_total") == {}
        assert backend.emulator.stats.received == 1
        stays = pool.submit(post, server.url, 0, 2, "stays")  # the freed place is usable
        wait_until(lambda: queue.total == 1)
    assert stays.result(timeout=10).status_code == 200
    assert sum(samples(server.url, "irm_admission_abandoned_total").values()) == 1
    assert_all_idle(server)


@pytest.mark.slow
def test_tenant_limits_answer_429(emulators: Emulators, router: Routers) -> None:
    (backend,) = emulators(1, max_num_seqs=4, time_per_output_token_s=0.01)
    tenants = {"rate": {"rate_per_s": 0.5, "burst": 2}, "one": {"max_concurrency": 1}}
    server = router(config_of([backend], 4, max_queue=4, tenants=tenants))
    body = {"model": "m", "prompt": "x", "max_tokens": 2}

    def send(key: str) -> httpx.Response:
        auth = {"authorization": f"Bearer {key}"}
        return httpx.post(f"{server.url}/v1/completions", json=body, headers=auth, timeout=30)

    assert [send("rate").status_code for _ in range(3)] == [200, 200, 429]
    limited = send("rate")
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["type"] == "TooManyRequestsError"
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(
            httpx.post,
            f"{server.url}/v1/completions",
            json={**body, "max_tokens": 40, "ignore_eos": True},
            headers={"authorization": "Bearer one"},
            timeout=30,
        )
        wait_until(lambda: any(s.requests_in_flight for s in server.app.router.stats()))
        assert send("one").status_code == 429
        assert send("someone-else").status_code == 200  # other tenants are not affected
        assert slow.result(timeout=10).status_code == 200
    assert send("one").status_code == 200
    outcomes = samples(server.url, "irm_requests_total")
    assert sum(v for k, v in outcomes.items() if dict(k)["outcome"] == "over_limit") == 3
    assert_all_idle(server)


# A load generator in a process of its own, so its client work does not compete with the router
# for this process's GIL: 2000 requests at once, each may wait at most 0.5 s.
_LOAD = """
import asyncio, json, sys
import httpx
async def main(url, count):
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        async def one(i):
            body = {"model": "m", "prompt": "x", "max_tokens": 2, "ignore_eos": True}
            try:
                r = await client.post("/v1/completions", json=body, headers={"x-irm-priority": str(i % 8)})
                return r.status_code
            except httpx.HTTPError:
                return 0
        codes = await asyncio.gather(*(one(i) for i in range(count)))
    print(json.dumps({str(c): codes.count(c) for c in set(codes)}))
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@pytest.mark.slow
def test_router_stays_responsive_under_overload(emulators: Emulators, router: Routers) -> None:
    backends = emulators(2, max_num_seqs=4, time_per_output_token_s=0.01)
    # Waiters wait up to 5 s: the overload lasts long enough for a loaded test machine (this
    # process serves the router, the backends and the questions) to ask twice while it is on.
    server = router(config_of(backends, 4, max_queue=500, max_wait_s=5.0, class_shares=ALL_SHARES))
    admission = server.app.admission
    load = subprocess.Popen(
        [sys.executable, "-c", _LOAD, server.url, "2000"], stdout=subprocess.PIPE, text=True
    )
    # What the status and metrics answers reported as waiting: an answer computed while 100 or
    # more requests wait was served during the overload, not after the queue drained.
    reported_waiting: dict[str, list[float]] = {"/irm/status": [], "/metrics": []}
    peak_waiting = 0
    with httpx.Client(base_url=server.url, timeout=30) as client:
        deadline = time.monotonic() + 60  # a bound on a stuck load generator, not a measurement
        while load.poll() is None and time.monotonic() < deadline:
            peak_waiting = max(peak_waiting, admission.queue.total)
            if admission.queue.total >= 100:  # ask while the overload is on
                status = client.get("/irm/status")
                assert status.status_code == 200
                reported_waiting["/irm/status"].append(status.json()["admission"]["waiting"])
                metrics = client.get("/metrics")
                assert metrics.status_code == 200
                reported_waiting["/metrics"].append(_queue_length(metrics.text))
            time.sleep(0.02)
    out, _ = load.communicate(timeout=60)
    codes = json.loads(out)
    assert sum(codes.values()) == 2000 and codes.get("200", 0) > 0 and codes.get("503", 0) > 0
    assert peak_waiting >= 100
    for path, waiting in reported_waiting.items():
        assert sum(1 for count in waiting if count >= 100) >= 2, (path, waiting)
    assert_all_idle(server)


def _queue_length(metrics_text: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "irm_admission_queue_length"
    )


def test_status_reports_the_queue(emulators: Emulators, router: Routers) -> None:
    (backend,) = emulators(1, max_num_seqs=1, time_per_output_token_s=0.01)
    server = router(config_of([backend], 1, max_queue=2, max_wait_s=5, class_shares=ALL_SHARES))
    with ThreadPoolExecutor(max_workers=1) as pool, holding(server.url):
        waiting: Future[httpx.Response] = pool.submit(post, server.url, 4, 2)
        wait_until(lambda: server.app.admission.queue.total == 1)
        status = httpx.get(f"{server.url}/irm/status").json()["admission"]
        assert status == {"waiting": 1, "waiting_by_class": [0, 0, 0, 0, 1, 0, 0, 0]}
    assert waiting.result(timeout=10).status_code == 200
    assert_all_idle(server)


def _served_while_waiting(server: RouterServer, count: int, make_room: Any) -> None:
    """Queues `count` requests, calls `make_room()` while they wait, and checks that every one is
    served: none shed (a 10 s max_wait_s is far longer than making room takes), all admitted from
    the queue."""
    queue = server.app.admission.queue
    key = (("class", "0"), ("wait", "queued"))
    queued_before = samples(server.url, "irm_admission_admitted_total").get(key, 0.0)
    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(post, server.url, 0, 2, str(i)) for i in range(count)]
        wait_until(lambda: queue.total == count, f"{count} requests waiting")
        make_room()
        codes = [future.result(timeout=30).status_code for future in futures]
    assert codes == [200] * count
    assert samples(server.url, "irm_admission_shed_total") == {}
    assert samples(server.url, "irm_admission_admitted_total")[key] == queued_before + count


@pytest.mark.slow
def test_waiters_are_served_when_the_only_backend_recovers(emulators: Emulators, router: Routers) -> None:
    (backend,) = emulators(1)
    server = router(config_of([backend], 4, FAST_FLEET, max_queue=8, max_wait_s=10))
    backend.emulator.reconfigure(unhealthy=True)
    wait_until(lambda: backend_status(server, backend.url)["state"] == "down", "down after failed checks")
    # Nothing arrives and nothing is released after the recovery: only the recovery serves them.
    _served_while_waiting(server, 4, lambda: backend.emulator.reconfigure(unhealthy=False))
    assert backend_status(server, backend.url)["state"] == "active"
    assert_all_idle(server)


@pytest.mark.slow
def test_waiters_are_served_when_a_drain_ends_or_capacity_grows(
    emulators: Emulators, router: Routers
) -> None:
    (backend,) = emulators(1, max_num_seqs=4, time_per_output_token_s=0.01)
    server = router(config_of([backend], 1, max_queue=8, max_wait_s=10, class_shares=ALL_SHARES))
    app: RoutingMiddleware = server.app
    with holding(server.url):  # the one slot stays taken: no release can serve the waiters
        _served_while_waiting(server, 3, lambda: app.update_backend(0, capacity=4))
    wait_idle(app)
    app.drain(0)
    assert backend_status(server, backend.url)["state"] == "draining"
    _served_while_waiting(server, 3, lambda: app.undrain(0))  # called from this thread, not the loop
    assert backend_status(server, backend.url)["state"] == "active"
    assert_all_idle(server)
