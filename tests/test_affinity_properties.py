"""Properties of the two cache-aware strategies, checked from the outside through `Router`:

- bounded load: with unit costs and no releases, no backend ever holds more than
  ⌈(1+ε) · fleet cost · its share⌉ + 1 while keys keep arriving (distinct keys and hot keys, several
  ε and fleet sizes, equal and unequal capacities), for consistent_hash and prefix_affinity;
- minimal disruption: in a quiet fleet, removing one of n backends moves only that backend's keys
  (about 1/n of them), adding one moves about 1/(n+1), all of them to the newcomer;
- capacity-weighted ring: on a mixed fleet each backend owns keys in proportion to its capacity,
  and removing or resizing a backend other than the largest moves keys only to or from it;
- the prefix index has fixed memory: two million distinct prompts leave the process's RSS flat
  after warm-up, old prompts are forgotten and recent ones remembered;
- the same prompt (or session key) routed twice in a quiet fleet lands on the same backend;
- index entries pointing at a removed or down backend are never used.

Randomness is hypothesis's or seeded; nothing depends on wall-clock time.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from irmiddleware import Accelerator, Router, prefix_hashes

AFFINITY_STRATEGIES = ("consistent_hash", "prefix_affinity")
# 64 slots gives the ring its maximum of 128 points per backend (2**21 / 64, clamped to 128).
MAX_ACCELERATORS = 64
_MASK = 2**64 - 1
_GOLDEN = 0x9E37_79B9_7F4A_7C15


def _router(strategy: str, capacities: Sequence[int], epsilon: float = 0.25, **options: int) -> Router:
    router = Router(strategy, max_accelerators=MAX_ACCELERATORS, seed=1, balance_epsilon=epsilon, **options)
    for index, capacity in enumerate(capacities):
        router.add_accelerator(Accelerator(index, capacity))
    return router


def _spread(value: int) -> int:
    """A well-mixed 64-bit stand-in for a block hash (real ones come out of a hash function)."""
    return (value * _GOLDEN + 0x632B_E59B_D9B4_E019) & _MASK


def _steer(strategy: str, key: int) -> dict[str, object]:
    """The affinity input for `key`: a session key, or a three-block prompt unique to the key."""
    if strategy == "consistent_hash":
        return {"affinity_key": key}
    return {"prefix_hashes": [_spread(3 * key + block) for block in range(3)]}


# ---- bounded load --------------------------------------------------------------------------------


def _bound(load_total: int, weighted: int, weighted_total: int, epsilon_permille: int) -> int:
    """⌈(1+ε) · fleet cost · share⌉ + 1, in exact arithmetic (the core's f64 can only be looser):
    integers, with ε in permille as the core keeps it (a `Fraction` gives the same, ~10x slower, and
    the test computes ~150,000 bounds)."""
    numerator = (1000 + epsilon_permille) * load_total * weighted
    return -(-numerator // (1000 * weighted_total)) + 1  # the ceiling of the quotient


def _keys(rng: random.Random, count: int, hot_keys: int, hot_fraction: float) -> list[int]:
    """`count` arrivals: each one of `hot_keys` popular keys with `hot_fraction`, else a new key."""
    keys = []
    for number in range(count):
        if hot_keys and rng.random() < hot_fraction:
            keys.append(rng.randrange(hot_keys))
        else:
            keys.append(1_000 + number)
    return keys


@settings(max_examples=40, deadline=None)
@given(
    strategy=st.sampled_from(AFFINITY_STRATEGIES),
    epsilon=st.sampled_from([0.05, 0.25, 0.5, 1.0]),
    # Capacities in units of 10,000 so that capacity never limits: only the bound does.
    capacity_units=st.lists(st.integers(1, 8), min_size=2, max_size=24),
    equal_capacities=st.booleans(),
    hot_keys=st.integers(0, 3),
    hot_fraction=st.sampled_from([0.3, 0.9]),
    seed=st.integers(0, 2**16),
)
def test_no_backend_ever_exceeds_the_bound_while_keys_arrive(
    strategy: str,
    epsilon: float,
    capacity_units: list[int],
    equal_capacities: bool,
    hot_keys: int,
    hot_fraction: float,
    seed: int,
) -> None:
    capacities = [10_000 * (1 if equal_capacities else units) for units in capacity_units]
    with _router(strategy, capacities, epsilon) as router:
        exact_epsilon = round(epsilon * 1000)  # The core keeps ε in permille.
        loads = [0] * len(capacities)
        keys = _keys(random.Random(seed), 30 * len(capacities), hot_keys, hot_fraction)
        for total, key in enumerate(keys, start=1):
            lease = router.acquire(1, **_steer(strategy, key))  # type: ignore[arg-type]
            assert lease is not None
            loads[lease.accelerator_id] += 1
            # Every backend, not only the chosen one: the others' bounds only grow, but check anyway.
            for index, load in enumerate(loads):
                assert load <= _bound(total, capacities[index], sum(capacities), exact_epsilon), (
                    index,
                    loads,
                )
        assert [stats.load for stats in router.stats()] == loads  # Our count is the core's.


# ---- minimal disruption --------------------------------------------------------------------------

# Keys sampled per measurement: enough that a backend's share is measured to a few percent.
DISRUPTION_KEYS = 12_000
# A backend's share of the keys is the length of its 128 arcs on the ring: relative standard
# deviation about 1/√128 ≈ 9 %, plus sampling noise of 12,000 keys (≤ 9 % at n = 40). A share over
# 1.5 or under 0.5 times the fair one is four standard deviations out.
SHARE_TOLERANCE = 0.5


def _owners(router: Router, keys: range) -> dict[int, int]:
    """Each key's backend in a quiet fleet: every lease is released at once, so each decision is
    made on an idle fleet, where the key's ring owner always takes it."""
    owners = {}
    for key in keys:
        lease = router.acquire(1, affinity_key=key)
        assert lease is not None and lease.affinity == "hit"
        owners[key] = lease.accelerator_id
        lease.release()
    return owners


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(count=st.integers(3, 40), data=st.data())
def test_removing_a_backend_moves_only_its_keys(count: int, data: st.DataObject) -> None:
    removed = data.draw(st.integers(0, count - 1), label="removed")
    with _router("consistent_hash", [100] * count) as router:
        keys = range(DISRUPTION_KEYS)
        before = _owners(router, keys)
        router.remove_accelerator(removed)
        after = _owners(router, keys)
        # Tolerance 0: the other backends' ring points stay where they were, so a key whose owner was
        # not removed has the same first point clockwise, and an idle owner is always within bound.
        moved_others = [key for key in keys if before[key] != removed and after[key] != before[key]]
        assert moved_others == []
        orphaned = sum(1 for key in keys if before[key] == removed)
        assert orphaned <= (1 + SHARE_TOLERANCE) * len(keys) / count
        assert all(owner != removed for owner in after.values())


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(count=st.integers(2, 40))
def test_adding_a_backend_moves_about_one_in_n_plus_one_keys_all_to_it(count: int) -> None:
    with _router("consistent_hash", [100] * count) as router:
        keys = range(DISRUPTION_KEYS)
        before = _owners(router, keys)
        router.add_accelerator(Accelerator(count, 100))
        after = _owners(router, keys)
        moved = [key for key in keys if after[key] != before[key]]
        assert all(after[key] == count for key in moved)  # Only the newcomer takes keys.
        fair = len(keys) / (count + 1)
        assert (1 - SHARE_TOLERANCE) * fair <= len(moved) <= (1 + SHARE_TOLERANCE) * fair


# ---- capacity-weighted ring ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "capacities",
    [[50, 50, 50, 200, 200, 200], [25, 50, 100, 200], [100] * 5 + [400] * 2, [30, 30, 30, 30, 30, 300]],
)
def test_keys_follow_capacity_on_a_mixed_fleet(capacities: list[int]) -> None:
    """Each backend has the same number of ring points, but a smaller one's points take a key
    only in proportion to its capacity: in a quiet fleet each backend owns a share of the keys
    close to its share of the capacity (the same tolerance as the equal-capacity tests)."""
    with _router("consistent_hash", capacities) as router:
        owners = _owners(router, range(DISRUPTION_KEYS))
        total = sum(capacities)
        for backend, capacity in enumerate(capacities):
            share = sum(1 for owner in owners.values() if owner == backend) / DISRUPTION_KEYS
            fair = capacity / total
            assert (1 - SHARE_TOLERANCE) * fair <= share <= (1 + SHARE_TOLERANCE) * fair, (
                backend,
                share,
                fair,
            )


@settings(max_examples=12, deadline=None)
@given(capacities=st.lists(st.sampled_from([25, 50, 100, 200]), min_size=3, max_size=30), data=st.data())
def test_changing_a_smaller_backend_moves_keys_only_to_or_from_it(
    capacities: list[int], data: st.DataObject
) -> None:
    """Removing a backend, or resizing one, moves no key between two other backends, as long as
    it is not the largest (whose capacity is the ring's scale)."""
    largest = max(capacities)
    smaller = [index for index, capacity in enumerate(capacities) if capacity < largest]
    if not smaller:
        return
    changed = data.draw(st.sampled_from(smaller), label="changed")
    with _router("consistent_hash", capacities) as router:
        keys = range(DISRUPTION_KEYS // 4)
        before = _owners(router, keys)
        if data.draw(st.booleans(), label="remove"):
            router.remove_accelerator(changed)
        else:
            new_capacity = data.draw(st.integers(1, largest), label="capacity")
            router.update_accelerator(changed, capacity=new_capacity)
        after = _owners(router, keys)
        assert [
            key for key in keys if changed not in (before[key], after[key]) and before[key] != after[key]
        ] == []


# ---- the prefix index's memory is fixed ----------------------------------------------------------

PROMPTS = 2_000_000
WARM_UP_PROMPTS = 200_000
BLOCKS_PER_PROMPT = 4
# Pages the process may still gain after warm-up (allocator noise). A leak of a single byte per
# prompt would add 1.8 MB over the remaining prompts.
RSS_SLACK_BYTES = 1_000_000


def _rss_bytes() -> int:
    fields = Path("/proc/self/statm").read_text().split()
    return int(fields[1]) * 4096  # Resident pages; Linux pages are 4 KiB on x86-64.


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_prefix_index_memory_stays_fixed_and_old_prompts_are_forgotten() -> None:
    import ctypes

    with _router("prefix_affinity", [1_000] * 8, prefix_index_entries=65_536) as router:
        old = [_spread(_MASK - block) for block in range(BLOCKS_PER_PROMPT)]
        router.acquire(1, prefix_hashes=old).release()  # type: ignore[union-attr]
        # One array refilled in place: the loop itself allocates nothing per prompt.
        hashes = (ctypes.c_uint64 * BLOCKS_PER_PROMPT)()
        rss_after_warm_up = rss_max = 0
        for prompt in range(PROMPTS):
            for block in range(BLOCKS_PER_PROMPT):
                hashes[block] = _spread(prompt * BLOCKS_PER_PROMPT + block)
            lease = router.acquire(1, prefix_hashes=hashes)
            assert lease is not None
            lease.release()
            if prompt == WARM_UP_PROMPTS:
                rss_after_warm_up = _rss_bytes()
            elif prompt > WARM_UP_PROMPTS and prompt % 100_000 == 0:
                rss_max = max(rss_max, _rss_bytes())
        assert rss_max - rss_after_warm_up <= RSS_SLACK_BYTES, (rss_after_warm_up, rss_max)
        # The first prompt was evicted long ago; the last few hundred (well inside 65,536 entries) are kept.
        forgotten = router.acquire(1, prefix_hashes=old)
        assert forgotten is not None and (forgotten.affinity, forgotten.matched_blocks) == ("miss", 0)
        forgotten.release()
        for prompt in range(PROMPTS - 500, PROMPTS):
            recent = [_spread(prompt * BLOCKS_PER_PROMPT + block) for block in range(BLOCKS_PER_PROMPT)]
            lease = router.acquire(1, prefix_hashes=recent)
            assert lease is not None and (lease.affinity, lease.matched_blocks) == ("hit", BLOCKS_PER_PROMPT)
            lease.release()


# ---- the same prompt twice -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(1, 30),
    text=st.text(min_size=64, max_size=2_000),
    others=st.lists(st.text(min_size=64, max_size=400), max_size=20),
)
def test_the_same_prompt_twice_lands_on_the_same_backend(count: int, text: str, others: list[str]) -> None:
    """prefix_affinity by the prompt's hashes, consistent_hash by the prompt as session key; other
    prompts routed (and released) in between do not change where it goes."""
    for strategy in AFFINITY_STRATEGIES:
        with _router(strategy, [10] * count) as router:
            first = _route_prompt(router, text)
            for other in others:
                _route_prompt(router, other)
            second = _route_prompt(router, text)
            assert second[0] == first[0]
            if strategy == "prefix_affinity":
                assert second[1:] == ("hit", len(prefix_hashes(text)))


def _route_prompt(router: Router, text: str) -> tuple[int, str | None, int]:
    if router.strategy == "consistent_hash":
        lease = router.acquire(1, affinity_key=text)
    else:
        lease = router.acquire(1, prefix_hashes=prefix_hashes(text))
    assert lease is not None
    lease.release()
    return lease.accelerator_id, lease.affinity, lease.matched_blocks


# ---- removed and down backends -------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(2, 12), how=st.sampled_from(["down", "removed", "replaced"]), key=st.integers(0, 2**40)
)
def test_entries_for_removed_or_down_backends_are_never_used(count: int, how: str, key: int) -> None:
    with _router("prefix_affinity", [10] * count) as router:
        prompt = _steer("prefix_affinity", key)["prefix_hashes"]
        lease = router.acquire(1, prefix_hashes=prompt)  # type: ignore[arg-type]
        assert lease is not None
        lease.release()
        holder = lease.accelerator_id
        if how == "down":
            router.set_state(holder, "down")
        else:
            router.remove_accelerator(holder)
            if how == "replaced":  # A restarted server under the same id has an empty cache.
                router.add_accelerator(Accelerator(holder, 10))
        again = router.acquire(1, prefix_hashes=prompt)  # type: ignore[arg-type]
        assert again is not None
        assert (again.affinity, again.matched_blocks) == ("miss", 0)
        assert how == "replaced" or again.accelerator_id != holder
        again.release()


@settings(max_examples=40, deadline=None)
@given(count=st.integers(2, 12), key=st.integers(0, 2**40))
def test_a_down_key_owner_gets_nothing_and_gets_its_keys_back(count: int, key: int) -> None:
    with _router("consistent_hash", [10] * count) as router:
        owner = _route_key(router, key)
        router.set_state(owner, "down")
        assert _route_key(router, key) != owner
        router.set_state(owner, "active")
        assert _route_key(router, key) == owner  # Its ring points never left.


def _route_key(router: Router, key: int) -> int:
    lease = router.acquire(1, affinity_key=key)
    assert lease is not None
    lease.release()
    return lease.accelerator_id


# ---- a core defect found here, fixed in zig/affinity.zig (setOf now mixes the hash) ---------------


def test_low_entropy_prefix_hashes_still_use_the_whole_index() -> None:
    """`prefix_hashes=` accepts any u64 ints; 100 one-block prompts with hashes 1..100 fit a
    65,536-entry index many times over, so all are remembered (before the fix they all landed in
    one 8-way set and none was)."""
    with _router("prefix_affinity", [10] * 4, prefix_index_entries=65_536) as router:
        for hash_value in range(1, 101):
            router.acquire(1, prefix_hashes=[hash_value]).release()  # type: ignore[union-attr]
        remembered = 0
        for hash_value in range(1, 101):
            lease = router.acquire(1, prefix_hashes=[hash_value])
            assert lease is not None
            remembered += lease.affinity == "hit"
            lease.release()
        assert remembered == 100
