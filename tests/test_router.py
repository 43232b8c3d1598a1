"""The Python routing API: what the seed promised (strategies, capacity, failover) and what a real
user needs on top (completion, leases, draining, removal with requests in flight, stats, batches,
pools, priority shares, the slot-level fast path), with clear errors for bad input; and that the
seed API's request records (kept in the core for int ids, by the router for any other id) refuse
duplicates, release exactly what was reserved once, and survive threads, reuse and closing."""

from __future__ import annotations

import collections
import contextlib
import gc
import io
import math
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from irmiddleware import (
    Accelerator,
    DuplicateBackendError,
    InvalidArgumentError,
    InvalidHandleError,
    ReleaseMismatchError,
    Request,
    Router,
    StaleReleaseError,
    TableFullError,
    UnknownBackendError,
)
from irmiddleware.testing import assert_idle

STRATEGIES = ("round_robin", "least_connections", "p2c")


Fleet = Callable[..., Router]
"""The `fleet` fixture: `fleet(strategy, capacities, **options)`."""


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    """`fleet(strategy, capacities, **options)`: a Router with accelerators 0, 1, ... of those
    capacities; every router built is closed when the test ends."""
    with contextlib.ExitStack() as stack:

        def build(strategy: str, capacities: list[int], **options: object) -> Router:
            router = Router(strategy, max_accelerators=max(16, len(capacities)), **options)  # type: ignore[arg-type]
            stack.enter_context(router)
            for index, capacity in enumerate(capacities):
                router.add_accelerator(Accelerator(index, capacity))
            return router

        yield build


def test_unknown_strategy_names_the_valid_ones() -> None:
    with pytest.raises(
        ValueError,
        match="consistent_hash, least_connections, least_ttft, p2c, prefix_affinity, queue_aware, "
        "round_robin",
    ):
        Router("fastest")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Accelerator(1, 0), "capacity"),
        (lambda: Accelerator(1, -5), "capacity"),
        (lambda: Accelerator(1, 2**31), "capacity"),
        (lambda: Accelerator(-1, 10), "id"),
        (lambda: Accelerator(1, 10, weight=0), "weight"),
        (lambda: Request(1, 0), "cost"),
        (lambda: Request(1, -3), "cost"),
        (lambda: Request(1, 1.5), "cost"),
        (lambda: Request(1, 1, 8), "priority"),
        (lambda: Request(1, 1, -1), "priority"),
    ],
)
def test_bad_values_are_refused_clearly(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


def test_duplicate_ids_are_refused(fleet: Fleet) -> None:
    router = fleet("p2c", [10])
    with pytest.raises(DuplicateBackendError):
        router.add_accelerator(Accelerator(0, 10))
    assert isinstance(DuplicateBackendError("duplicate_id", ""), ValueError)


def test_table_full_is_refused() -> None:
    with Router("p2c", max_accelerators=2) as router:
        router.add_accelerator(Accelerator(1, 10))
        router.add_accelerator(Accelerator(2, 10))
        with pytest.raises(TableFullError):
            router.add_accelerator(Accelerator(3, 10))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_capacity_is_never_exceeded_and_none_means_full(fleet: Fleet, strategy: str) -> None:
    router = fleet(strategy, [10, 20, 30])
    routed = [router.route_request(Request(index, 3)) for index in range(30)]
    # 3 + 6 + 10 requests of cost 3 fit in capacities 10, 20, 30 (at priority 0: the whole capacity).
    assert sum(result is not None for result in routed) == 3 + 6 + 10
    assert routed[-1] is None
    for stats in router.stats():
        assert stats.load <= stats.capacity
    for index, result in enumerate(routed):
        if result is not None:
            router.complete(index)
    assert_idle(router)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_down_and_draining_accelerators_get_nothing(fleet: Fleet, strategy: str) -> None:
    router = fleet(strategy, [100, 100, 100])
    router.set_state(0, "down")
    router.drain(1)
    chosen = collections.Counter(router.route_request(Request(index)) for index in range(50))
    assert chosen == {2: 50}
    router.set_state(0, "active")
    assert router.route_request(Request(999, 1)) is not None


def test_round_robin_rotates_with_failover(fleet: Fleet) -> None:
    router = fleet("round_robin", [1, 5, 5])
    order = [router.route_request(Request(index)) for index in range(7)]
    assert order[:3] == [0, 1, 2]
    assert order[3:] == [1, 2, 1, 2]  # 0 is full: skipped, not an error.


def test_least_connections_follows_relative_load(fleet: Fleet) -> None:
    router = fleet("least_connections", [10, 100])
    picks = collections.Counter(router.route_request(Request(index)) for index in range(55))
    # Equal relative load means 10 : 100.
    assert picks == {0: 5, 1: 50}


def test_p2c_spreads_load_and_is_reproducible_with_a_seed(fleet: Fleet) -> None:
    def picks(seed: int) -> list[int | None]:
        router = fleet("p2c", [1000] * 8, seed=seed)
        return [router.route_request(Request(index)) for index in range(400)]

    first = picks(7)
    assert first == picks(7)
    counts = collections.Counter(first)
    assert len(counts) == 8
    assert max(counts.values()) - min(counts.values()) <= 2  # two choices keep the gap tiny


def test_weight_scales_the_share() -> None:
    with Router("least_connections", max_accelerators=4) as router:
        router.add_accelerator(Accelerator(1, 100, weight=3.0))
        router.add_accelerator(Accelerator(2, 100, weight=1.0))
        picks = collections.Counter(router.route_request(Request(index)) for index in range(80))
    assert picks == {1: 60, 2: 20}


def test_lease_releases_on_exit_and_marks_exceptions_failed(fleet: Fleet) -> None:
    router = fleet("p2c", [10])
    with router.lease(Request(1, 4)) as accelerator_id:
        assert accelerator_id == 0
        assert router.load(0) == 4
    with pytest.raises(RuntimeError), router.lease(Request(2, 4)):
        raise RuntimeError("upstream broke")
    stats = router.accelerator_stats(0)
    assert (stats.completed, stats.failed, stats.load) == (1, 1, 0)


def test_lease_yields_none_when_nothing_fits(fleet: Fleet) -> None:
    router = fleet("p2c", [2])
    with router.lease(Request(1, 3)) as accelerator_id:
        assert accelerator_id is None
    assert_idle(router)


def test_a_lease_is_released_exactly_once(fleet: Fleet) -> None:
    router = fleet("round_robin", [10])
    lease = router.acquire(2)
    assert lease is not None
    lease.release()
    with pytest.raises(ReleaseMismatchError):
        lease.release()
    assert_idle(router)


def test_complete_unknown_and_duplicate_requests_are_refused(fleet: Fleet) -> None:
    router = fleet("p2c", [10])
    with pytest.raises(KeyError):
        router.complete(42)
    router.route_request(Request(1))
    with pytest.raises(ValueError, match="already in flight"):
        router.route_request(Request(1))
    router.complete(Request(1), ok=False, latency_s=0.25)
    stats = router.accelerator_stats(0)
    assert stats.failed == 1
    assert stats.latency_ewma_s == pytest.approx(0.25)


def test_removal_with_requests_in_flight_keeps_accounting_exact(fleet: Fleet) -> None:
    router = fleet("round_robin", [10, 10])
    held = [router.acquire(1) for _ in range(4)]
    router.remove_accelerator(0)
    assert router.accelerators == [1]
    with pytest.raises(UnknownBackendError):
        router.load(0)
    assert all(router.route_request(Request(index)) == 1 for index in range(3))
    for lease in held:
        assert lease is not None
        lease.release()
    router.add_accelerator(Accelerator(0, 5))  # The id can come back.
    assert router.load(0) == 0
    for index in range(3):
        router.complete(index)
    assert_idle(router)


def test_update_capacity_while_routing(fleet: Fleet) -> None:
    router = fleet("round_robin", [10])
    assert router.acquire(6) is not None
    router.update_accelerator(0, capacity=5)
    assert router.acquire(1) is None  # 6 in flight > 5: nothing new until it drains
    router.update_accelerator(0, capacity=20, weight=2.0)
    assert router.acquire(10) is not None
    assert router.accelerator_stats(0).weight == 2.0


def test_priority_classes_keep_headroom_for_urgent_traffic(fleet: Fleet) -> None:
    router = fleet("round_robin", [100], class_shares=[1.0, 0.5])
    assert router.acquire(50, priority=1) is not None
    assert router.acquire(1, priority=1) is None  # class 1 may fill only half
    assert router.acquire(50, priority=0) is not None  # class 0 still finds room


def test_batch_routing_matches_per_call_semantics(fleet: Fleet) -> None:
    router = fleet("round_robin", [4, 4], class_shares=[1.0, 1.0])
    requests = [Request(index, 1, index % 2) for index in range(10)]
    routed = router.route_batch(requests)
    assert sum(result is not None for result in routed) == 8
    assert router.in_flight == 8
    with pytest.raises(ValueError, match="already in flight"):
        router.route_batch(requests[:1])
    router.complete_batch(requests)
    assert router.in_flight == 0
    assert_idle(router)


def test_pools_restrict_choice_and_share_one_account(fleet: Fleet) -> None:
    router = fleet("p2c", [10, 10, 10])
    router.set_pool("llama", [0, 1])
    router.set_pool("mistral", [1, 2], strategy="round_robin")
    leases = [router.acquire(1, pool="llama") for _ in range(20)]
    assert {lease.accelerator_id for lease in leases if lease} == {0, 1}
    assert router.acquire(1, pool="llama") is None
    # Backend 1 is full from llama's traffic, so mistral only finds backend 2.
    assert {router.acquire(1, pool="mistral").accelerator_id for _ in range(5)} == {2}  # type: ignore[union-attr]
    with pytest.raises(KeyError, match="no pool named"):
        router.acquire(1, pool="gpt")
    router.remove_accelerator(1)
    assert router.pools == {"llama": [0], "mistral": [2]}


def test_current_load_of_an_added_accelerator_is_live() -> None:
    accelerator = Accelerator(5, 10)
    assert accelerator.current_load == 0
    with Router("p2c", max_accelerators=4) as router:
        router.add_accelerator(accelerator)
        router.route_request(Request(1, 7))
        assert accelerator.current_load == 7


def test_bad_state_names_are_refused(fleet: Fleet) -> None:
    router = fleet("p2c", [10])
    with pytest.raises(ValueError, match="draining"):
        router.set_state(0, "sleeping")
    with pytest.raises(UnknownBackendError):
        router.set_state(7, "down")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("signal_age_max_s", -1.0),
        ("signal_age_max_s", 0.0),
        ("signal_age_max_s", 2**32 / 1000),  # would wrap to 0 ms in the core's u32
        ("signal_age_max_s", 1e300),
        ("signal_age_max_s", math.nan),
        ("signal_age_max_s", math.inf),
        ("balance_epsilon", -4294967.296),  # would wrap to 0 in the core's u32
        ("balance_epsilon", 1e300),
        ("balance_epsilon", math.nan),
        ("balance_epsilon", math.inf),
    ],
)
def test_options_out_of_range_are_refused_not_wrapped(option: str, value: float) -> None:
    with pytest.raises(InvalidArgumentError, match=option):
        Router("queue_aware", **{option: value})


def test_class_share_out_of_range_is_refused_and_frees_the_table() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InvalidArgumentError):
            Router("p2c", class_shares=[1.0, 0.0])
        gc.collect()
    # The table opened before the option was refused is closed at once, not left to `__del__`.
    assert [w for w in caught if "unclosed native table" in str(w.message)] == []


def test_queue_aware_avoids_reported_queues_while_they_are_fresh(fleet: Fleet) -> None:
    router = fleet("queue_aware", [100, 100, 100], seed=3)
    router.set_signals(0, queue_depth=40, kv_usage=0.5)
    picks = collections.Counter(router.acquire(1).accelerator_id for _ in range(60))  # type: ignore[union-attr]
    assert picks[0] == 0
    router.set_signals(0, queue_depth=40, read_at=time.monotonic() - 60)  # stale: ignored
    picks = collections.Counter(router.acquire(1).accelerator_id for _ in range(60))  # type: ignore[union-attr]
    assert picks[0] > 0


def test_bad_signals_are_refused(fleet: Fleet) -> None:
    router = fleet("queue_aware", [10])
    with pytest.raises(ValueError, match="kv_usage"):
        router.set_signals(0, queue_depth=1, kv_usage=1.5)
    with pytest.raises(ValueError, match="queue_depth"):
        router.set_signals(0, queue_depth=-1)


def test_slot_calls_route_and_release_like_leases(fleet: Fleet) -> None:
    router = fleet("least_connections", [2, 2])
    tickets = [router.acquire_slot(2) for _ in range(3)]
    assert tickets[2] is None  # both full
    held = [ticket for ticket in tickets if ticket is not None]
    assert sorted(router.id_of_slot(ticket) for ticket in held) == [0, 1]
    # A ticket names the slot (its low half) and the slot's incarnation (its high half).
    assert [router.slot_of(router.id_of_slot(ticket)) for ticket in held] == [t & 0xFFFF_FFFF for t in held]
    assert (router.load(0), router.load(1)) == (2, 2)
    router.release_slot(held[0], 2, 250_000, True)
    router.release_slot(held[1], 2, ok=False)
    stats = {s.id: s for s in router.stats()}
    assert sorted((s.completed, s.failed) for s in stats.values()) == [(0, 1), (1, 0)]
    assert stats[router.id_of_slot(held[0])].latency_ewma_s == pytest.approx(0.25)
    assert_idle(router)


def test_slot_calls_honour_pools_and_affinity(fleet: Fleet) -> None:
    router = fleet("consistent_hash", [10, 10, 10])
    router.set_pool("llama", [1, 2], strategy="round_robin")
    chosen = [router.acquire_slot(1, pool="llama") for _ in range(4)]
    assert {router.id_of_slot(slot) for slot in chosen if slot is not None} == {1, 2}
    for slot in chosen:
        router.release_slot(slot, 1)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="no pool named"):
        router.acquire_slot(1, pool="gpt")
    decisions = []
    for _ in range(3):  # an idle fleet: the key's ring owner each time
        slot, affinity, matched = router.acquire_slot_affine(1, affinity_key="session-7")
        decisions.append((slot, affinity, matched))
        router.release_slot(slot, 1)  # type: ignore[arg-type]
    assert decisions[0][0] is not None and decisions == [(decisions[0][0], "hit", 0)] * 3
    plain = fleet("p2c", [10])
    ticket, affinity, matched = plain.acquire_slot_affine(1, affinity_key=3)
    assert (plain.id_of_slot(ticket), affinity, matched) == (0, None, 0)  # type: ignore[arg-type]
    prefix = fleet("prefix_affinity", [10, 10])
    hashes = [11, 12, 13]
    slot, affinity, _matched = prefix.acquire_slot_affine(1, prefix_hashes=hashes)
    assert affinity == "miss"
    assert prefix.acquire_slot_affine(1, prefix_hashes=hashes) == (slot, "hit", 3)


def test_slot_of_another_process_is_named(shared_name: str) -> None:
    with (
        Router("p2c", shared_memory=shared_name) as worker,
        Router("p2c", shared_memory=shared_name) as owner,
    ):
        owner.add_accelerator(Accelerator(42, 4))  # after the worker attached: it learns the id late
        slot = worker.acquire_slot(3)
        assert slot is not None and worker.id_of_slot(slot) == 42
        assert owner.load(42) == 3
        worker.release_slot(slot, 3)
        assert_idle(owner)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda r: r.acquire_slot(0), InvalidArgumentError, "cost"),
        (lambda r: r.acquire_slot(1.5), InvalidArgumentError, "cost"),
        (lambda r: r.acquire_slot(2**32 + 1), InvalidArgumentError, "cost"),  # not masked to 1
        (lambda r: r.acquire_slot("1"), InvalidArgumentError, "cost"),
        (lambda r: r.acquire_slot(1, 8), InvalidArgumentError, "priority"),
        (lambda r: r.acquire_slot(1, 0.0), InvalidArgumentError, "priority"),
        (lambda r: r.acquire_slot_affine(-1, affinity_key=1), InvalidArgumentError, "cost"),
        (lambda r: r.acquire_slot_affine(1, -1, affinity_key=1), InvalidArgumentError, "priority"),
        (lambda r: r.release_slot(9, 1), UnknownBackendError, "slot 9"),
        (lambda r: r.release_slot(-1, 1), UnknownBackendError, "slot"),
        (lambda r: r.release_slot("0", 1), UnknownBackendError, "slot"),
        (lambda r: r.release_slot(2**64, 1), UnknownBackendError, "slot"),  # not masked to 0
        (lambda r: r.release_slot(0.0, 1), InvalidArgumentError, "slot"),
        (lambda r: r.release_slot(0, 0), InvalidArgumentError, "cost"),
        (lambda r: r.release_slot(0, 1, -5), InvalidArgumentError, "latency_us"),
        (lambda r: r.release_slot(0, 1, 0.5), InvalidArgumentError, "latency_us"),
        (lambda r: r.id_of_slot(9), UnknownBackendError, "slot 9"),
        (lambda r: r.id_of_slot(-1), UnknownBackendError, "slot -1"),
        (lambda r: r.slot_of(7), UnknownBackendError, "id 7"),
    ],
)
def test_bad_slot_calls_are_refused_clearly(
    fleet: Fleet, call: object, error: type[Exception], message: str
) -> None:
    router = fleet("p2c", [10])
    held = router.acquire_slot(2)
    with pytest.raises(error, match=message):
        call(router)  # type: ignore[operator]
    assert router.load(0) == 2  # a refused call changes nothing
    router.release_slot(held, 2)  # type: ignore[arg-type]
    assert_idle(router)


def test_a_slot_released_twice_is_refused(fleet: Fleet) -> None:
    router = fleet("round_robin", [10])
    slot = router.acquire_slot(2)
    assert slot is not None
    router.release_slot(slot, 2)
    with pytest.raises(ReleaseMismatchError):
        router.release_slot(slot, 2)
    assert router.accelerator_stats(0).completed == 1
    assert_idle(router)


def run_api_doc_example(heading: str) -> str:
    """Runs the first Python block under `heading` in doc/api.md; returns what it printed."""
    text = (Path(__file__).resolve().parents[1] / "doc" / "api.md").read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    output = io.StringIO()
    namespace: dict[str, object] = {"__name__": "api_example"}
    with contextlib.redirect_stdout(output):
        exec(compile(block.group(1), "doc/api.md", "exec"), namespace)
    for value in namespace.values():  # the example's routers, freed now rather than by `__del__`
        if isinstance(value, Router):
            value.close()
    return output.getvalue()


def test_the_slot_example_of_the_api_doc_runs() -> None:
    output = run_api_doc_example("## Slot-level calls")
    assert re.fullmatch(r"accelerator (10|20)\nhit\n", output), output


def test_the_seed_api_example_of_the_api_doc_runs() -> None:
    output = run_api_doc_example("## The seed API's requests")
    assert output == "request 7 is already in flight; complete it first\n0 0\n", output


def test_a_stale_release_is_refused_and_leaves_the_new_accelerator_alone() -> None:
    with Router("round_robin", max_accelerators=1) as router:  # one slot: a new accelerator reuses it
        router.add_accelerator(Accelerator(1, capacity=10))
        first, second = router.acquire_slot(2), router.acquire_slot(3)
        assert first is not None and second is not None
        router.remove_accelerator(1)  # retired, two requests still in flight
        router.release_slot(first, 2)
        router.release_slot(second, 3)  # the last one: the slot is free again
        router.add_accelerator(Accelerator(2, capacity=10))
        assert router.slot_of(2) == second & 0xFFFF_FFFF  # the very slot `second` named
        held = router.acquire_slot(3)  # the same cost: only the incarnation tells them apart
        assert held is not None
        with pytest.raises(StaleReleaseError):
            router.release_slot(second, 3)  # a late duplicate of the old accelerator's release
        stats = router.accelerator_stats(2)
        assert (stats.load, stats.requests_in_flight, stats.routed, stats.completed, stats.failed) == (
            3, 1, 1, 0, 0,
        )  # fmt: skip
        router.release_slot(held, 3)
        assert_idle(router)


# ---- the seed API's request records --------------------------------------------------------------


def test_a_request_in_flight_is_refused_again_on_every_path(fleet: Fleet) -> None:
    router = fleet("round_robin", [10, 10])
    router.set_pool("all", [0, 1])
    router.route_request(Request(1))  # recorded in the core
    router.route_request(Request("a"))  # any hashable id: recorded by the router
    router.route_request(Request(2), pool="all")  # an option: recorded by the router
    for again in (Request(1), Request("a"), Request(2), Request(True)):  # True == 1
        with pytest.raises(ValueError, match="already in flight"):
            router.route_request(again)
        with pytest.raises(ValueError, match="already in flight"):
            router.route_request(again, pool="all")
        with pytest.raises(ValueError, match="already in flight"):
            router.route_batch([again])
    assert router.in_flight == 3
    assert (router.load(0), router.load(1)) == (2, 1)  # the refusals reserved nothing
    for request_id in (1, "a", 2):
        router.complete(request_id)
    assert router.in_flight == 0
    assert_idle(router)


class _RequestId(int):
    """An int-like id that is not exactly an int (as a numpy integer is)."""


@pytest.mark.parametrize("request_id", [-1, 2**64, "job-7", (3, 4), _RequestId(5), 5.0])
def test_ids_the_core_does_not_take_route_and_complete_alike(fleet: Fleet, request_id: object) -> None:
    router = fleet("p2c", [10])
    assert router.route_request(Request(request_id, 2)) == 0
    assert router.in_flight == 1
    with pytest.raises(ValueError, match="already in flight"):
        router.route_request(Request(request_id))
    router.complete(request_id, ok=False, latency_s=0.5)
    stats = router.accelerator_stats(0)
    assert (stats.load, stats.failed, stats.latency_ewma_s) == (0, 1, pytest.approx(0.5))
    with pytest.raises(KeyError, match="not in flight"):
        router.complete(request_id)


def test_an_equal_int_id_is_the_same_request_whichever_record_holds_it(fleet: Fleet) -> None:
    router = fleet("round_robin", [10])
    router.route_request(Request(_RequestId(7)))  # recorded by the router
    with pytest.raises(ValueError, match="already in flight"):
        router.route_request(Request(7))  # the fast path checks the router's record too
    router.route_request(Request(8))  # recorded in the core
    with pytest.raises(ValueError, match="already in flight"):
        router.route_request(Request(_RequestId(8)))
    router.complete(7)
    router.complete(_RequestId(8))
    assert router.in_flight == 0
    assert_idle(router)


def test_complete_releases_exactly_once_what_was_reserved(fleet: Fleet) -> None:
    router = fleet("least_connections", [10, 10])
    assert router.route_request(Request(2**64 - 1, 3, 2)) is not None  # the largest id the core takes
    assert router.route_request(Request(2**40, 4)) is not None
    assert sorted((router.load(0), router.load(1))) == [3, 4]
    router.complete(Request(2**40, 4), latency_s=0.125)
    router.complete(2**64 - 1)
    with pytest.raises(KeyError, match="not in flight"):
        router.complete(2**40)
    stats = router.stats()
    assert sum(s.completed for s in stats) == 2
    assert max(s.latency_ewma_s for s in stats) == pytest.approx(0.125)
    assert_idle(router)


@pytest.mark.parametrize(
    ("cost", "priority", "message"),
    [(2.5, 0, "cost"), (2**32 + 1, 0, "cost"), (1, 2**32, "priority"), (1, 0.0, "priority")],
)
def test_a_request_changed_after_construction_is_checked_again(
    fleet: Fleet, cost: object, priority: object, message: str
) -> None:
    router = fleet("round_robin", [10])
    request = Request(1)
    request.cost, request.priority = cost, priority  # type: ignore[assignment]
    with pytest.raises(InvalidArgumentError, match=message):
        router.route_request(request)  # never truncated to 32 bits on the way to the core
    assert router.in_flight == 0
    assert_idle(router)


def test_batches_see_and_complete_the_requests_the_core_records(fleet: Fleet) -> None:
    router = fleet("round_robin", [10, 10])
    router.route_request(Request(1))
    with pytest.raises(ValueError, match="already in flight"):
        router.route_batch([Request(0), Request(1)])
    assert router.route_batch([Request(0), Request(2)]) == [1, 0]
    assert router.in_flight == 3
    router.complete_batch([Request(0), 1, Request(2), Request(99)])  # 99 was never routed: skipped
    assert router.in_flight == 0
    assert_idle(router)


def test_a_completion_after_the_slot_was_reused_is_refused() -> None:
    with Router("round_robin", max_accelerators=1) as router:  # one slot: a new accelerator reuses it
        router.add_accelerator(Accelerator(1, capacity=10))
        assert router.route_request(Request(7, 2)) == 1
        extra = router.acquire_slot(2)
        assert extra is not None
        router.remove_accelerator(1)
        router.release_slot(extra, 2)
        router.release_slot(extra, 2)  # a wrong second release frees the slot behind the record
        router.add_accelerator(Accelerator(2, capacity=10))
        assert router.route_request(Request(8, 2)) == 2
        with pytest.raises(StaleReleaseError):
            router.complete(7)
        stats = router.accelerator_stats(2)
        assert (stats.load, stats.completed) == (2, 0)  # the new accelerator was left alone
        with pytest.raises(KeyError):
            router.complete(7)  # the record is gone either way
        router.complete(8)
        assert_idle(router)


def test_threads_routing_and_completing_leave_nothing_in_flight(fleet: Fleet) -> None:
    router = fleet("p2c", [50] * 8)

    def work(thread_index: int) -> int:
        routed = 0
        for round_index in range(300):
            request_id = thread_index << 32 | round_index
            if router.route_request(Request(request_id, 1 + round_index % 3)) is not None:
                routed += 1
                if round_index % 4 == 0:
                    router.complete(request_id, ok=round_index % 8 == 0)
        for round_index in range(300):
            if round_index % 4:
                with contextlib.suppress(KeyError):  # not routed (nothing fitted)
                    router.complete(thread_index << 32 | round_index)
        return routed

    with ThreadPoolExecutor(max_workers=6) as pool:
        routed = sum(pool.map(work, range(12)))
    assert router.in_flight == 0
    stats = router.stats()
    assert sum(s.completed + s.failed for s in stats) == routed == sum(s.routed for s in stats)
    assert_idle(router)


def test_closing_with_requests_in_flight_frees_their_records() -> None:
    router = Router("round_robin", max_accelerators=4)
    router.add_accelerator(Accelerator(1, capacity=1000))
    for request_id in range(500):  # enough to grow the core's record map several times
        router.route_request(Request(request_id))
    router.route_request(Request("kept by the router"))
    assert router.in_flight == 501
    router.close()
    assert router.in_flight == 1  # the core's records went with the table
    with pytest.raises(InvalidHandleError):
        router.route_request(Request(1000))
    with pytest.raises(InvalidHandleError):
        router.complete(3)
    router.close()  # idempotent


def test_route_request_names_any_accelerator_id_even_one_another_process_added(shared_name: str) -> None:
    with (
        Router("round_robin", shared_memory=shared_name) as worker,
        Router("round_robin", shared_memory=shared_name) as owner,
    ):
        ids = {2**64 - 1, 2**31, 2**31 - 1, 7}  # both sides of what fits the core's i32 result
        for accelerator_id in ids:  # after the worker attached: it never saw them added
            owner.add_accelerator(Accelerator(accelerator_id, 4))
        routed = {worker.route_request(Request(index)) for index in range(len(ids))}
        assert routed == ids
        for index in range(len(ids)):
            worker.complete(index)
        assert_idle(owner)


SEED_API_CLOSED_UNDER_THREADS = """
import itertools, sys, threading
from irmiddleware import Accelerator, InvalidHandleError, Request, Router

ids = itertools.count()  # unique across threads (next() on a count is atomic under the GIL)

def seed_api_loop(router, ended):
    try:
        while True:
            request_id = next(ids)
            if router.route_request(Request(request_id)) is not None and request_id % 3:
                router.complete(request_id)  # every third stays in flight, for close to free
    except InvalidHandleError:
        ended.append(threading.current_thread().name)

for round_index in range(int(sys.argv[1])):
    with Router("p2c", max_accelerators=4) as router:
        router.add_accelerator(Accelerator(1, capacity=64))
        ended = []
        workers = [threading.Thread(target=seed_api_loop, args=(router, ended)) for _ in range(3)]
        [worker.start() for worker in workers]
        threading.Event().wait(0.0005 * (round_index % 4))
    [worker.join() for worker in workers]
    assert len(ended) == 3, ended
print("survived")
"""


@pytest.mark.slow
def test_closing_under_seed_api_threads_frees_their_records_safely() -> None:
    # A route or complete that touched the record map after close freed it would kill the child
    # with a signal (the shipped library checks bounds) instead of ending each thread cleanly.
    result = subprocess.run(
        [sys.executable, "-c", SEED_API_CLOSED_UNDER_THREADS, "120"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip() == "survived"
