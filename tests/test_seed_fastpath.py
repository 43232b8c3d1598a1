"""The seed API's per-call path made in the core (zig/python.zig): `Router.route_request` and
`Router.complete` are builtins bound to each router and `Request` is a type the core makes. This
file proves that they behave exactly as the Python methods they stand in for (results, records
and every error with its message), that they leak or steal no reference and no memory over many
calls, that threads routing and completing through them leave exact counters, and that the
tables of the builtins, the binding and the Zig source agree."""

from __future__ import annotations

import contextlib
import copy
import gc
import pickle
import re
import sys
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from irmiddleware import Accelerator, Request, Router, _native
from irmiddleware._errors import InvalidArgumentError, InvalidHandleError
from irmiddleware.testing import assert_idle

ZIG = Path(__file__).resolve().parent.parent / "zig"

pytestmark = pytest.mark.skipif(
    _native._SEED_BUILTINS is None,
    reason="the core makes its builtins only on CPython",
)


@pytest.fixture
def router() -> Iterator[Router]:
    """Round robin over accelerators 1000 and 2**40 (an id the core's result cannot hold)."""
    with Router("round_robin", max_accelerators=4) as built:
        built.add_accelerator(Accelerator(1000, 50))
        built.add_accelerator(Accelerator(2**40, 50))
        yield built


def python_route(router: Router) -> Callable[..., int | None]:
    """The router's Python method, bypassing its builtin."""
    return lambda *args, **kwargs: Router.route_request(router, *args, **kwargs)


def python_complete(router: Router) -> Callable[..., None]:
    return lambda *args, **kwargs: Router.complete(router, *args, **kwargs)


def test_the_plain_calls_are_builtins_and_request_is_the_cores_type(router: Router) -> None:
    assert type(router.route_request).__name__ == "builtin_function_or_method"
    assert type(router.complete).__name__ == "builtin_function_or_method"
    assert Request.__mro__[1] is _native.RequestBase
    assert Request.__mro__[1] is not _native._PythonRequestBase


def outcome(call: Callable[[], object]) -> tuple[str, object]:
    try:
        return "returned", call()
    except Exception as error:  # The type and message are what is compared.
        return type(error).__name__, str(error)


class _Id(int):
    """An int-like id the core does not record (as a numpy integer)."""


SCENARIOS: list[list[tuple[str, tuple[object, ...], dict[str, object]]]] = [
    # Routed, refused as a duplicate, completed twice (the second: KeyError).
    [("route", (Request(1, 3),), {}), ("route", (Request(1),), {}), ("complete", (1,), {}),
     ("complete", (Request(1),), {})],
    # Ids the core does not record, alone and then beside one it does.
    [("route", (Request("job", 2),), {}), ("route", (Request(2),), {}), ("route", (Request(_Id(2)),), {}),
     ("complete", ("job",), {}), ("complete", (_Id(2),), {}), ("complete", (2,), {})],
    [("route", (Request(-1),), {}), ("route", (Request(2**64),), {}), ("complete", (-1,), {}),
     ("complete", (2**64,), {}), ("complete", (Request(5),), {})],
    # Options and keywords go to the Python method.
    [("route", (), {"request": Request(3)}), ("route", (Request(4),), {"pool": None}),
     ("complete", (Request(3),), {"ok": False, "latency_s": 0.25}), ("complete", (), {"request": 4})],
    # Requests changed after construction, or not Requests at all.
    [("route", (Request(5, 2),), {"affinity_key": None}), ("route", ("not a request",), {}),
     ("route", (), {}), ("route", (Request(6), Request(7)), {}), ("complete", (), {}),
     ("complete", (5, 6), {}), ("complete", (5,), {})],
    # Every accelerator full: None, and nothing recorded.
    [*(("route", (Request(index, 50),), {}) for index in range(2)), ("route", (Request(9),), {}),
     ("complete", (9,), {}), ("complete", (0,), {}), ("complete", (1,), {})],
]  # fmt: skip


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_builtins_answer_as_the_python_methods(
    scenario: list[tuple[str, tuple[object, ...], dict[str, object]]],
) -> None:
    answers = []
    for make_calls in (
        lambda r: {"route": r.route_request, "complete": r.complete},
        lambda r: {"route": python_route(r), "complete": python_complete(r)},
    ):
        with Router("round_robin", max_accelerators=4) as router:
            router.add_accelerator(Accelerator(1000, 50))
            router.add_accelerator(Accelerator(2**40, 50))
            calls = make_calls(router)
            answers.append(
                [outcome(partial(calls[name], *args, **kwargs)) for name, args, kwargs in scenario]
            )
            answers[-1].append(("in flight", router.in_flight))
            answers[-1].append(("loads", (router.load(1000), router.load(2**40))))
    assert answers[0] == answers[1]


def test_a_request_changed_after_construction_is_read_again(router: Router) -> None:
    request = Request(1)
    request.cost = 2.5  # type: ignore[assignment]
    with pytest.raises(InvalidArgumentError, match="cost"):
        router.route_request(request)
    del request.cost
    with pytest.raises(AttributeError, match="cost"):
        router.route_request(request)
    request.cost = 7
    assert router.route_request(request) == 1000
    assert router.load(1000) == 7
    router.complete(request)
    assert_idle(router)


def test_wide_accelerator_ids_come_back_whole(router: Router) -> None:
    assert [router.route_request(Request(index)) for index in range(4)] == [1000, 2**40, 1000, 2**40]
    for index in range(4):
        router.complete(index)
    assert_idle(router)


def test_kept_builtins_are_refused_after_close_and_after_the_router_is_gone() -> None:
    router = Router("round_robin", max_accelerators=2)
    router.add_accelerator(Accelerator(1, 10))
    route, complete = router.route_request, router.complete
    assert route(Request(1)) == 1
    router.close()
    assert type(router.route_request).__name__ == "method"  # back to the methods, which refuse
    with pytest.raises(InvalidHandleError, match="route request 2: invalid handle"):
        route(Request(2))
    with pytest.raises(InvalidHandleError, match="complete request 1: invalid handle"):
        complete(1)
    del router
    gc.collect()
    with pytest.raises(InvalidHandleError, match="garbage-collected"):
        route(Request("kept"))  # the Python method's call, and the router is gone
    with pytest.raises(InvalidHandleError, match="garbage-collected"):
        complete("kept")


def test_the_builtins_do_not_keep_their_router_alive() -> None:
    closed: list[bool] = []

    class Watched(Router):
        def close(self) -> None:
            closed.append(True)
            super().close()

        def __del__(self) -> None:
            self.close()

    router = Watched("p2c", max_accelerators=2)
    route = router.route_request
    del router
    assert closed == [True]  # freed at once: no reference cycle through the builtins
    assert type(route).__name__ == "builtin_function_or_method"


def test_a_subclass_that_overrides_a_method_keeps_it() -> None:
    class Counting(Router):
        routed = 0

        def route_request(self, request: Request, **options: object) -> int | None:  # type: ignore[override]
            self.routed += 1
            return super().route_request(request, **options)  # type: ignore[arg-type]

    with Counting("round_robin", max_accelerators=2) as router:
        router.add_accelerator(Accelerator(1, 10))
        assert router.route_request(Request(1)) == 1
        assert router.routed == 1
        router.complete(1)
        assert_idle(router)


def test_a_request_subclass_with_its_own_init_builds_and_routes_as_before(router: Router) -> None:
    class Tagged(Request):
        __slots__ = ("tag",)

        def __init__(self, id: int, tag: str, cost: int = 1) -> None:
            super().__init__(id, cost)
            self.tag = tag

    request = Tagged(5, "gpu", 3)
    assert (request.id, request.cost, request.priority, request.tag) == (5, 3, 0, "gpu")
    assert router.route_request(request) == 1000  # not exactly Request: read by attribute
    assert router.load(1000) == 3
    router.complete(request)
    request.__init__(6, "cpu")  # type: ignore[misc]
    assert (request.id, request.cost) == (6, 1)
    assert_idle(router)


def test_requests_copy_pickle_and_print_as_before() -> None:
    request = Request("job-7", 3, 2)
    for clone in (copy.copy(request), copy.deepcopy(request), pickle.loads(pickle.dumps(request))):
        assert type(clone) is Request
        assert (clone.id, clone.cost, clone.priority) == ("job-7", 3, 2)
    assert repr(request) == "Request(id='job-7', cost=3, priority=2)"
    assert repr(Request(id=5, priority=1)) == "Request(id=5, cost=1, priority=1)"
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'id'"):
        Request()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Request(1, 2, 3, 4)  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        request.other = 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("base", [_native.RequestBase, _native._PythonRequestBase])
@pytest.mark.parametrize(
    ("arguments", "message"),
    [((1, 0), "cost must be an int in 1..2147483647, got 0"), ((1, 2.5), "got 2.5"),
     ((1, True), "got True"), ((1, 2**31), "got 2147483648"), ((1, 1, 8), "priority must be an int in 0..7"),
     ((1, 1, -1), "got -1"), ((1, 1, 1.0), "got 1.0")],
)  # fmt: skip
def test_both_request_bases_refuse_the_same_fields(
    base: type, arguments: tuple[object, ...], message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        base(*arguments)


def test_a_request_in_a_reference_cycle_is_collected() -> None:
    freed: list[bool] = []

    class Holder:
        request: Request

        def __del__(self) -> None:
            freed.append(True)

    holder = Holder()
    holder.request = Request(holder)  # type: ignore[arg-type]
    del holder
    gc.collect()
    assert freed == [True]


def counts(*objects: object) -> list[int]:
    return [sys.getrefcount(value) for value in objects]


def test_no_reference_is_leaked_or_stolen_on_any_path(router: Router) -> None:
    # Ints above 256 are not shared with the interpreter, so their counts are this test's.
    request_id, cost, accelerator = 10**6 + 1, 10**6 + 2, 10**6 + 3
    router.add_accelerator(Accelerator(accelerator, 10**7))
    router.set_pool("big", [accelerator])
    request = Request(request_id, cost - 10**6)
    big = Request(10**6 + 4, cost, 0)
    string = Request("job")
    before = counts(request, request_id, cost, big, string, accelerator)
    route, complete = router.route_request, router.complete
    for _ in range(2000):
        route(request)
        with contextlib.suppress(ValueError):
            route(request)  # a duplicate: refused
        complete(request)
        with contextlib.suppress(KeyError):
            complete(request_id)  # completed already
        route(big, pool="big")  # keywords: the Python method
        complete(big)
        route(string)  # an id the core does not record
        complete("job")
        Request(request_id, cost).__init__(request_id, cost, 0)  # built, built again, freed
        with contextlib.suppress(InvalidArgumentError):
            Request(request_id, cost, priority=request_id)  # a keyword, refused
    assert counts(request, request_id, cost, big, string, accelerator) == before
    assert_idle(router)


def pairs(router: Router, count: int, first: int) -> None:
    route, complete = router.route_request, router.complete
    for request_id in range(first, first + count):
        if route(Request(request_id, 1, request_id % 8)) is not None:
            complete(request_id)


def test_many_calls_allocate_nothing_that_stays(router: Router) -> None:
    pairs(router, 2000, 0)  # warm up: the core's records, the interpreter's caches
    tracemalloc.start()
    try:
        pairs(router, 20_000, 10**6)
        first, _peak = tracemalloc.get_traced_memory()
        pairs(router, 20_000, 2 * 10**6)
        second, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert second - first < 4096
    assert_idle(router)


@pytest.mark.slow  # a million route+complete pairs
def test_a_million_calls_leave_every_count_and_the_heap_as_they_were(router: Router) -> None:
    accelerator = 10**6 + 7
    router.add_accelerator(Accelerator(accelerator, 10**7))
    request_id, cost = 10**6 + 8, 10**6
    request = Request(request_id, cost)
    before = counts(request, request_id, cost, accelerator)
    tracemalloc.start()
    try:
        pairs(router, 1000, 0)
        start, _peak = tracemalloc.get_traced_memory()
        route, complete = router.route_request, router.complete
        for _ in range(1_000_000):
            assert route(request) == accelerator
            complete(request)
        end, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert counts(request, request_id, cost, accelerator) == before
    assert end - start < 4096
    assert_idle(router)


def test_threads_routing_and_completing_through_the_builtins_count_exactly() -> None:
    with Router("p2c", max_accelerators=8, seed=3) as router:
        for index in range(8):
            router.add_accelerator(Accelerator(index, 40))
        route, complete = router.route_request, router.complete
        routed = [0] * 6
        barrier = threading.Barrier(6)

        def work(thread: int) -> None:
            barrier.wait()
            for round_index in range(3000):
                request_id = thread << 40 | round_index
                if route(Request(request_id, 1 + round_index % 3, round_index % 8)) is not None:
                    routed[thread] += 1
                    if round_index % 3:
                        complete(request_id if round_index % 2 else Request(request_id))
            for round_index in range(3000):
                if round_index % 3 == 0:
                    with contextlib.suppress(KeyError):  # not routed: nothing fitted
                        complete(thread << 40 | round_index)

        threads = [threading.Thread(target=work, args=(thread,)) for thread in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        assert router.in_flight == 0
        stats = router.stats()
        assert sum(s.routed for s in stats) == sum(routed) == sum(s.completed for s in stats)
        assert_idle(router)


# ---- the three sides agree ------------------------------------------------------------------------


def zig_source() -> str:
    return (ZIG / "python.zig").read_text()


def test_the_python_api_order_matches_the_zig_struct() -> None:
    body = re.search(r"pub const Api = extern struct \{(.*?)\n\};", zig_source(), re.DOTALL)
    assert body is not None
    fields = re.findall(r"^    (\w+): ", body.group(1), re.MULTILINE)
    assert fields == [*_native._PYTHON_API, "int_type", "none", "request_fields"]


def test_the_state_entries_match_the_zig_enum() -> None:
    body = re.search(r"pub const Item = enum\(isize\) \{(.*?)\n\};", zig_source(), re.DOTALL)
    assert body is not None
    entries = re.findall(r"^    (\w+) = (\d+),", body.group(1), re.MULTILINE)
    assert [name for name, _ in entries] == list(_native.SEED_STATE)
    assert [int(number) for _, number in entries] == list(range(len(_native.SEED_STATE)))


def test_the_bound_count_matches() -> None:
    found = re.search(r"pub const bound_count: u32 = (\d+);", zig_source())
    assert found is not None
    assert int(found.group(1)) == _native._BOUND_COUNT
