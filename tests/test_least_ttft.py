"""The `least_ttft` strategy and priced reservations through the Python API: it is a known strategy
(and a plugin strategy), keeps a repeated prompt on the backend that cached it, sends an uncached
prompt to the faster (heavier) backend, leaves a cached backend whose queue outweighs the cache,
stays on a cached backend that has a free batch slot (`set_batch_slots`; bad values refused), and
a reservation discounted by the cached blocks is given back exactly (the core's load equals
the sum of what is held after any sequence, and returns to zero, also under concurrent load)."""

from __future__ import annotations

import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from irmiddleware import Accelerator, Router, prefix_hashes
from irmiddleware._plugins import collect, load_plugins
from irmiddleware._router import STRATEGIES
from irmiddleware.hooks import NativeStrategy
from irmiddleware.testing import assert_idle

SYSTEM = "You are a meticulous assistant who answers in full sentences. " * 8


def test_least_ttft_is_a_native_strategy_and_a_plugin_strategy() -> None:
    assert "least_ttft" in STRATEGIES
    manager, broken = load_plugins()
    strategy, _plugin = collect(manager, broken).strategy("least_ttft")
    assert strategy == NativeStrategy("least_ttft", "least_ttft")


def test_a_repeated_prompt_stays_where_it_is_cached() -> None:
    with Router("least_ttft", block_cost=1.0) as router:
        for accelerator in range(4):
            router.add_accelerator(Accelerator(accelerator, 100))
        hashes = prefix_hashes(SYSTEM + "What is the capital of France?")
        first = router.acquire(prefix_hashes=hashes)
        assert first is not None and first.affinity == "miss"
        first.release()
        for _ in range(10):
            lease = router.acquire(prefix_hashes=hashes)
            assert lease is not None
            assert (lease.accelerator_id, lease.affinity, lease.matched_blocks) == (
                first.accelerator_id,
                "hit",
                len(hashes),
            )
            lease.release()
        assert_idle(router)


def test_an_uncached_prompt_goes_to_the_faster_backend() -> None:
    with Router("least_ttft", block_cost=1.0) as router:
        router.add_accelerator(Accelerator(0, 1000, weight=1.0))
        router.add_accelerator(Accelerator(1, 1000, weight=3.0))
        held = [router.acquire_on(0, 10), router.acquire_on(1, 10)]  # equal queues
        fresh = prefix_hashes("A question nobody asked before, long enough for several blocks. " * 3)
        lease = router.acquire(prefix_hashes=fresh)
        assert lease is not None and (lease.accelerator_id, lease.affinity) == (1, "miss")
        lease.release()
        for other in held:
            assert other is not None
            other.release()
        assert_idle(router)


def test_a_queue_longer_than_the_cache_saves_sends_the_prompt_elsewhere() -> None:
    with Router("least_ttft", block_cost=1.0) as router:
        router.add_accelerator(Accelerator(0, 1000))
        router.add_accelerator(Accelerator(1, 1000))
        hashes = prefix_hashes(SYSTEM)  # 7 blocks: worth 7 cost units of queue
        busy = router.acquire_on(1, 50)
        first = router.acquire(prefix_hashes=hashes)
        assert first is not None and first.accelerator_id == 0
        first.release()
        assert busy is not None
        busy.release()
        again = router.acquire(prefix_hashes=hashes)
        assert again is not None and (again.accelerator_id, again.affinity) == (0, "hit")
        again.release()
        queue = router.acquire_on(0, 20)
        moved = router.acquire(prefix_hashes=hashes)
        assert moved is not None and (moved.accelerator_id, moved.affinity) == (1, "overload")
        moved.release()
        assert queue is not None
        queue.release()
        assert_idle(router)


def test_with_batch_slots_a_conversation_stays_while_its_backend_has_a_free_slot() -> None:
    hashes = prefix_hashes(SYSTEM)  # 7 blocks at 0.3 requests each: 2.1 requests to fill elsewhere
    for batch_slots, stays in ((0, False), (4, True)):
        with Router("least_ttft", block_cost=0.3) as router:
            for accelerator in range(2):
                router.add_accelerator(Accelerator(accelerator, 1000))
                router.set_batch_slots(accelerator, batch_slots)
            first = router.acquire(prefix_hashes=hashes)
            assert first is not None
            cached = first.accelerator_id
            running = [router.acquire_on(cached, 1) for _ in range(2)]
            # 3 requests run where the prompt is cached, none on the other backend. Batch not
            # known: they are a queue of 3 (and over the bounded load), the prompt goes to the
            # other backend. In a batch of 4 they leave a slot free: it stays on its cache.
            again = router.acquire(prefix_hashes=hashes)
            assert again is not None
            assert (again.accelerator_id == cached) is stays, (batch_slots, again.accelerator_id)
            for lease in (first, again, *running):
                assert lease is not None
                lease.release()
            assert_idle(router)


def test_bad_batch_slots_are_refused_clearly() -> None:
    with Router("least_ttft") as router:
        router.add_accelerator(Accelerator(0, 10))
        for bad in (-1, 2**32, 1.5, True):
            with pytest.raises(ValueError, match="batch_slots"):
                router.set_batch_slots(0, bad)  # type: ignore[arg-type]
        router.set_batch_slots(0, 8)


def test_a_discounted_reservation_is_released_exactly() -> None:
    with Router("least_ttft", block_cost=2.0, discount_cached=True) as router:
        for accelerator in range(2):
            router.add_accelerator(Accelerator(accelerator, 10_000))
        hashes = prefix_hashes(SYSTEM)
        first = router.acquire(100, prefix_hashes=hashes)
        assert first is not None and first.cost == 100  # nothing cached yet
        second = router.acquire(100, prefix_hashes=hashes)
        assert second is not None
        if second.accelerator_id == first.accelerator_id:
            assert second.cost == max(1, 100 - 2 * len(hashes))
        assert router.load(0) + router.load(1) == first.cost + second.cost
        first.release()
        second.release()
        assert_idle(router)


def test_a_bad_block_cost_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="block_cost"):
        Router("least_ttft", block_cost=-1)


prompts = [prefix_hashes(SYSTEM[: 64 * n] + f"question {n}" * n) for n in range(1, 9)]


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["least_ttft", "prefix_affinity", "p2c"]),
    st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.integers(1, 400)), max_size=80),
)
def test_load_always_equals_what_is_held(strategy: str, steps: list[tuple[bool, int, int]]) -> None:
    with Router(strategy, block_cost=3.0, discount_cached=True, seed=1) as router:
        for accelerator in range(3):
            router.add_accelerator(Accelerator(accelerator, 2_000))
        held = []
        for acquire, prompt, cost in steps:
            if acquire or not held:
                lease = router.acquire(cost, prefix_hashes=prompts[prompt])
                if lease is not None:
                    assert 1 <= lease.cost <= cost
                    held.append(lease)
            else:
                held.pop(prompt % len(held)).release()
            assert sum(stats.load for stats in router.stats()) == sum(lease.cost for lease in held)
        for lease in held:
            lease.release()
        assert_idle(router)


def test_in_flight_returns_to_zero_under_concurrent_load() -> None:
    with Router("least_ttft", block_cost=2.0, discount_cached=True) as router:
        for accelerator in range(4):
            router.add_accelerator(Accelerator(accelerator, 5_000, weight=1.0 + accelerator / 2))
        errors: list[BaseException] = []

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            held = []
            try:
                for _ in range(2_000):
                    if held and rng.random() < 0.5:
                        held.pop(rng.randrange(len(held))).release()
                        continue
                    lease = router.acquire(rng.randint(1, 300), prefix_hashes=rng.choice(prompts))
                    if lease is not None:
                        held.append(lease)
                for lease in held:
                    lease.release()
            except BaseException as error:  # pragma: no cover - reported below
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors
        assert_idle(router)
