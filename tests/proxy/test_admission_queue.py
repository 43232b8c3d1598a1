"""Admission control without sockets, on fake clocks: the wait queue serves by class then arrival,
ages waiters so lower classes cannot starve, lets a later waiter in when the best one does not fit,
evicts the least urgent newest waiter from a full queue, and forgets waiters that left; classes are
read from header, body, tenant, route and global default in that order; tenant rate and
concurrency limits answer 429 with Retry-After; and `[admission]` errors name their key."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from irmiddleware.hooks import RouteInfo
from irmiddleware.proxy import ConfigError, RoutingMiddleware, create_app, load_config, parse_config
from irmiddleware.proxy._admission import Admission, Shed, WaitQueue
from irmiddleware.proxy.config import AdmissionConfig, parse_admission


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()  # futures only: never run
    yield loop
    loop.close()


def queue_of(
    loop: asyncio.AbstractEventLoop, fits: Callable[[str, int], bool] = lambda m, c: True, **admission: Any
) -> tuple[WaitQueue[str], Clock]:
    clock = Clock()
    config = parse_admission({"max_queue": 100, "aging_s": 0, **admission})
    return WaitQueue(
        config, lambda model, c, _route: f"lease:{model}:{c}" if fits(model, c) else None, clock
    ), clock


def test_served_by_class_then_arrival(loop: asyncio.AbstractEventLoop) -> None:
    queue, _ = queue_of(loop)
    arrivals = [("a", 3), ("b", 1), ("c", 3), ("d", 0), ("e", 1)]
    waiters = {name: queue.enter("m", c, loop.create_future()) for name, c in arrivals}
    served = []
    for _ in arrivals:  # one freed slot at a time, as releases come
        assert queue.dispatch(["m"], limit=1) == 1
        served += [name for name, w in waiters.items() if w.future.done() and name not in served]
    assert served == ["d", "b", "e", "a", "c"]
    assert queue.total == 0 and queue.waiting == [0] * 8


def test_aging_promotes_a_long_waiter(loop: asyncio.AbstractEventLoop) -> None:
    queue, clock = queue_of(loop, aging_s=1.0)
    old = queue.enter("m", 7, loop.create_future())
    clock.now += 5.5  # effective class 7 - 5 = 2
    urgent = queue.enter("m", 1, loop.create_future())
    queue.dispatch(["m"], limit=1)
    assert urgent.future.done() and not old.future.done()
    clock.now += 1.0  # old: 7 - 6 = 1, as urgent as a new class-1 arrival, and it came first
    queue.enter("m", 1, loop.create_future())
    queue.dispatch(["m"], limit=1)
    assert old.future.result() == "lease:m:1"  # admitted at the class it was promoted to


def test_a_later_waiter_gets_in_when_the_best_does_not_fit(loop: asyncio.AbstractEventLoop) -> None:
    queue, _ = queue_of(loop, fits=lambda model, c: model == "small")
    best = queue.enter("big", 0, loop.create_future())
    later = queue.enter("small", 4, loop.create_future())
    assert queue.dispatch(["big", "small"], limit=1) == 1
    assert later.future.done() and not best.future.done() and best.live
    assert queue.dispatch(["big", "small"]) == 0  # the best stays first in line


def test_full_queue_evicts_least_urgent_newest(loop: asyncio.AbstractEventLoop) -> None:
    queue, _ = queue_of(loop, max_queue=3)
    older, newer, urgent = (queue.enter("m", c, loop.create_future()) for c in (5, 5, 2))
    arrival = queue.enter("m", 1, loop.create_future())
    assert newer.future.result() is None and not newer.live  # evicted: answered 503
    assert older.live and urgent.live and arrival.live and queue.total == 3
    with pytest.raises(Shed) as shed:
        queue.enter("m", 5, loop.create_future())  # nobody less urgent to evict
    assert (shed.value.status, shed.value.reason) == (503, "queue_full")


def test_class_bounds_and_no_wait(loop: asyncio.AbstractEventLoop) -> None:
    queue, _ = queue_of(loop, classes={"6": {"max_queue": 1}, "7": {"max_queue": 0}})
    queue.enter("m", 6, loop.create_future())
    with pytest.raises(Shed, match="capacity") as full:
        queue.enter("m", 6, loop.create_future())
    with pytest.raises(Shed) as no_wait:
        queue.enter("m", 7, loop.create_future())
    assert full.value.reason == "queue_full" and no_wait.value.reason == "no_capacity"


def test_waiters_that_left_free_their_place(loop: asyncio.AbstractEventLoop) -> None:
    queue, _ = queue_of(loop, max_queue=2)
    gone = queue.enter("m", 0, loop.create_future())
    cancelled = queue.enter("m", 0, loop.create_future())
    queue.leave(gone)
    cancelled.future.cancel()  # a task cancelled but not yet run its `finally`
    stays = queue.enter("m", 0, loop.create_future())
    assert queue.dispatch(["m"], limit=1) == 1 and stays.future.done()
    queue.leave(cancelled)  # its `finally` runs later: nothing counted twice
    assert queue.total == 0 and queue.waiting == [0] * 8


# ---- classes and tenants -------------------------------------------------------------------------


_APPS: list[RoutingMiddleware] = []
"""Apps built by `admission_of`, closed when the test ends (`_close_apps`)."""


@pytest.fixture(autouse=True)
def _close_apps() -> Iterator[None]:
    yield
    while _APPS:
        _APPS.pop().close()


def admission_of(**table: Any) -> tuple[Admission, Any, Clock]:
    config = parse_config({"backends": [{"url": "http://127.0.0.1:9", "models": ["m"]}], "admission": table})
    app = create_app(config)
    _APPS.append(app)
    clock = Clock()
    admission = Admission(config.admission, app.fleet, CollectorRegistry(), 1, clock=clock)
    return admission, app.fleet.backends[0].adapter, clock


def classify(admission: Admission, adapter: Any, headers: dict[str, str], body: dict[str, Any]) -> int:
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    route, _body, ticket = admission.admit(
        raw, adapter, RouteInfo("/v1/completions", "m"), json.dumps(body).encode()
    )
    with ticket:
        return route.priority


def test_class_sources_in_order() -> None:
    admission, adapter, _ = admission_of(
        default_class=3, routes={"/v1/completions": 4}, tenants={"batch": {"default_class": 6}}
    )
    assert classify(admission, adapter, {"x-irm-priority": "1"}, {"priority": 5}) == 1
    assert classify(admission, adapter, {"authorization": "Bearer batch"}, {"priority": 99}) == 7  # clamped
    assert classify(admission, adapter, {"authorization": "Bearer batch"}, {}) == 6
    assert classify(admission, adapter, {"authorization": "Bearer other"}, {}) == 4
    with pytest.raises(Shed) as bad:
        classify(admission, adapter, {"x-irm-priority": "urgent"}, {})
    assert bad.value.status == 400 and "x-irm-priority" in bad.value.message


def test_priority_is_forwarded_only_when_configured() -> None:
    for forward, expected in ((True, 2), (False, None)):
        admission, adapter, _ = admission_of(forward_priority=forward)
        raw = [(b"x-irm-priority", b"2")]
        _route, body, _ticket = admission.admit(
            raw, adapter, RouteInfo("/v1/completions", "m"), b'{"model":"m"}'
        )
        assert json.loads(body).get("priority") == expected


def test_tenant_rate_and_concurrency_limits() -> None:
    admission, adapter, clock = admission_of(
        tenants={"k": {"rate_per_s": 2.0, "burst": 2}}, tenant_defaults={"max_concurrency": 1}
    )
    key = [(b"authorization", b"Bearer k")]
    route = RouteInfo("/v1/completions", "m")
    for _ in range(2):
        admission.admit(key, adapter, route, b"{}")[2].__exit__()
    with pytest.raises(Shed) as over_rate:
        admission.admit(key, adapter, route, b"{}")
    assert (over_rate.value.status, over_rate.value.reason, over_rate.value.retry_after) == (
        429,
        "over_rate",
        1,
    )
    clock.now += 0.5  # one token back
    admission.admit(key, adapter, route, b"{}")
    other = [(b"authorization", b"Bearer someone")]
    held = admission.admit(other, adapter, route, b"{}")[2]
    with pytest.raises(Shed) as over_concurrency:
        admission.admit(other, adapter, route, b"{}")
    assert over_concurrency.value.reason == "over_concurrency"
    with held:
        pass
    admission.admit(other, adapter, route, b"{}")[2].__exit__()  # the slot came back


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"max_queue": -1}, "admission.max_queue"),
        ({"class_shares": [1.0, 0.5, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5]}, "admission.class_shares[2]"),
        ({"class_shares": [1.0]}, "admission.class_shares"),
        ({"classes": {"8": {}}}, "admission.classes.8"),
        ({"classes": {"2": {"max_wait": 1}}}, "admission.classes.2.max_wait"),
        ({"routes": {"/v1/completions": 9}}, "admission.routes./v1/completions"),
        ({"tenants": {"k": {"rate_per_s": "fast"}}}, 'admission.tenants."k".rate_per_s'),
        ({"default_class": 8}, "admission.default_class"),
        ({"queue": 3}, "admission.queue"),
    ],
)
def test_config_errors_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        parse_config({"backends": [{"url": "http://127.0.0.1:9"}], "admission": table})


def test_defaults_keep_the_routers_old_behaviour() -> None:
    config = parse_config({"backends": [{"url": "http://127.0.0.1:9"}]}).admission
    assert config == AdmissionConfig() and config.max_queue == 0 and config.default_class == 0


def test_the_documented_example_config_loads() -> None:
    config = load_config(Path(__file__).parents[2] / "examples" / "admission.toml").admission
    assert config.max_queue == 256 and config.max_wait_of(6) == 2.0 and config.max_queue_of(6) == 64
    assert config.tenants["sk-batch-team"].default_class == 6 and config.routes["/v1/embeddings"] == 4
