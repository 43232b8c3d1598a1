"""consistent_hash's ring is the same in every router that names its accelerators the same way
(`Router.set_ring_name`), whatever ids it gave them and in whatever order it added them; without
names the ring follows the ids, so routers that number the same servers differently disagree (the
check below can fail). Renaming one accelerator moves only keys to or from it, and `None` puts it
back where its id places it."""

from __future__ import annotations

from collections.abc import Sequence

from irmiddleware import Accelerator, Router

URLS = [f"http://10.0.0.{host}:8000" for host in range(1, 7)]
KEYS = [f"user-{number}" for number in range(400)]


def _owners(ids: Sequence[int], urls: Sequence[str], named: bool) -> dict[str, str]:
    """The URL owning each key in a consistent_hash router that adds `urls` with `ids`."""
    with Router("consistent_hash", max_accelerators=16) as router:
        for accelerator_id, url in zip(ids, urls, strict=True):
            router.add_accelerator(Accelerator(accelerator_id, 8))
            if named:
                router.set_ring_name(accelerator_id, url)
        url_of = dict(zip(ids, urls, strict=True))
        owners = {}
        for key in KEYS:
            lease = router.acquire(affinity_key=key)
            assert lease is not None
            owners[key] = url_of[lease.accelerator_id]
            lease.release()
        return owners


def test_named_accelerators_give_the_same_owners_whatever_ids_and_order() -> None:
    first = _owners(range(6), URLS, named=True)
    assert _owners([50 + i for i in range(6)][::-1], URLS[::-1], named=True) == first
    assert len(set(first.values())) == len(URLS)


def test_without_names_the_ring_follows_ids() -> None:
    assert _owners(range(6), URLS[::-1], named=False) != _owners(range(6), URLS, named=False)


def test_renaming_moves_only_that_accelerators_keys() -> None:
    with Router("consistent_hash", max_accelerators=16) as router:
        for accelerator_id in range(6):
            router.add_accelerator(Accelerator(accelerator_id, 8))

        def owners() -> dict[str, int]:
            result = {}
            for key in KEYS:
                lease = router.acquire(affinity_key=key)
                assert lease is not None
                result[key] = lease.accelerator_id
                lease.release()
            return result

        by_id = owners()
        router.set_ring_name(3, "http://renamed:8000")
        renamed = owners()
        moved = [key for key in KEYS if renamed[key] != by_id[key]]
        assert moved, "a new name must move some keys"
        assert all(by_id[key] == 3 or renamed[key] == 3 for key in moved)
        router.set_ring_name(3, None)
        assert owners() == by_id
