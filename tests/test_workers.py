"""Routers on one shared-memory table behave as one router (in one test process, each router on its
own uvicorn server and event loop, against a real vLLM emulator): a request waiting in one router is
served when capacity is freed in another, and a tenant's concurrency limit counts the requests of
every router; adding or removing a backend on a shared table is refused (409) while a drain is
not (unless followers are set, as `serve --workers` does); a router that forgets a backend another
removed never routes to its slot again, even once a new backend reuses it; a tenant's rate bucket
on a shared table is one bucket for every router; the release watcher wakes the event loop when
another router releases; the `[router] workers` and `shared_table` keys, `serve --workers` and
`bench-proxy --workers` refuse bad values with one clear line, workers go with `[[discovery]]`,
and the example file's key parses. The multi-process side (supervisor,
workers, kill -9, fleet changes) is in test_workers_serve.py and proxy/test_workers_fleet.py."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from irmiddleware import Accelerator, Router, unlink_shared
from irmiddleware.bench._proxy import bench_proxy_main
from irmiddleware.proxy import ConfigError, create_app, load_config, parse_config
from irmiddleware.proxy._fleet import FleetChangeRefused
from irmiddleware.proxy._rates import FleetRates, remove_rates_file
from irmiddleware.proxy._serve import serve_main
from irmiddleware.proxy._shared import ReleaseWatcher, remove_lock_file, tenants_table
from irmiddleware.testing import create_vllm_app, serve_in_thread, wait_until

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "router.toml"
SLOW_TOKENS = {"time_per_request_s": 0.0, "time_per_prompt_token_s": 0.0, "time_per_output_token_s": 0.01}


def _document(url: str, capacity: int = 1, **router: Any) -> dict[str, Any]:
    return {
        "router": router,
        "backends": [{"url": url, "type": "vllm", "capacity": capacity, "models": ["m"]}],
        "admission": {"max_queue": 8, "max_wait_s": 20.0, "tenant_defaults": {"max_concurrency": 1}},
    }


@contextlib.contextmanager
def _shared_routers(url: str, count: int, capacity: int = 1) -> Iterator[list[str]]:
    """`count` routers on one new shared table, each served on its own uvicorn server; yields
    their URLs and removes the table at the end."""
    name = f"test-workers-{secrets.token_hex(4)}"
    config = parse_config(_document(url, capacity, shared_table=name))
    apps = [create_app(config) for _ in range(count)]
    try:
        with contextlib.ExitStack() as stack:
            yield [stack.enter_context(serve_in_thread(app, lifespan=True)).url for app in apps]
    finally:
        for app in apps:
            app.close()
        _remove_tables(name)


def _remove_tables(name: str) -> None:
    """Removes a shared table, its tenants' table and their lock files."""
    for table in (name, tenants_table(name)):
        with contextlib.suppress(OSError):
            unlink_shared(table)
        remove_lock_file(table)


@contextlib.contextmanager
def _held_stream(url: str, headers: dict[str, str] | None = None) -> Iterator[None]:
    body = {"model": "m", "prompt": "Hi", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept: dropping the iterator closes the stream
        next(lines)
        yield


def _complete(url: str, results: list[int], headers: dict[str, str] | None = None) -> None:
    body = {"model": "m", "prompt": "Hi", "max_tokens": 2, "ignore_eos": True}
    results.append(httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30).status_code)


def _waiting(url: str) -> int:
    waiting: int = httpx.get(f"{url}/irm/status").json()["admission"]["waiting"]
    return waiting


def test_a_waiter_in_one_router_is_served_when_another_frees_capacity() -> None:
    app = create_vllm_app(served_model_names=("m",), **SLOW_TOKENS)
    with serve_in_thread(app) as backend, _shared_routers(backend.url, 2) as (first, second):
        results: list[int] = []
        with _held_stream(first):  # the backend's one slot, held through the first router
            waiter = threading.Thread(target=_complete, args=(second, results))
            waiter.start()
            wait_until(lambda: _waiting(second) == 1, "the request waits in the second router")
        # The first router released; only the table tells the second one.
        waiter.join(30)
        assert results == [200]
        assert app.state.emulator.stats.peak_in_progress == 1


def test_a_tenant_limit_counts_the_requests_of_every_router() -> None:
    app = create_vllm_app(served_model_names=("m",), max_num_seqs=8, **SLOW_TOKENS)
    app_headers = {"authorization": "Bearer team-a"}
    with serve_in_thread(app) as backend, _shared_routers(backend.url, 2, capacity=4) as (first, second):
        results: list[int] = []
        with _held_stream(first, app_headers):
            _complete(second, results, app_headers)  # over the limit of 1, counted in the first
            _complete(second, results, {"authorization": "Bearer team-b"})  # another tenant waits
        assert results[0] == 429
        assert results[1] == 200
        # The first router frees the unit when it notices the client left (a moment after the
        # hang-up), and counts the request right after that.
        wait_until(lambda: 'outcome="client_disconnected"' in httpx.get(f"{first}/metrics").text)
        _complete(second, results, app_headers)  # the stream ended: its unit came back
        assert results[2] == 200


def test_backends_are_fixed_on_a_shared_table() -> None:
    name = f"test-workers-{secrets.token_hex(4)}"
    app = create_app(parse_config(_document("http://127.0.0.1:9", shared_table=name)))
    try:
        app.drain(0)  # a state change reaches every process through the table: allowed
        with pytest.raises(FleetChangeRefused) as refused:
            app.remove_backend(0)
        assert refused.value.status == 409
    finally:
        app.close()
        _remove_tables(name)


@pytest.mark.parametrize(
    ("router", "message"),
    [
        ({"workers": 0}, "router.workers"),
        ({"workers": 64}, "router.workers"),
        ({"shared_table": "no/slash"}, "router.shared_table"),
        ({"shared_table": ".hidden"}, "router.shared_table"),
        ({"workers": 2, "shared_table": "t"}, "not both"),
    ],
)
def test_bad_worker_keys_are_refused(router: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(_document("http://127.0.0.1:9", **router))


def test_workers_go_with_discovery() -> None:
    # The supervisor resolves the names and its workers follow the fleet it makes (doc/workers.md).
    document = {"router": {"workers": 2}, "discovery": [{"dns": "vllm.local:8000"}]}
    assert parse_config(document).workers == 2


def test_workers_and_shared_table_keys_are_read() -> None:
    assert parse_config(_document("http://127.0.0.1:9", workers=4)).workers == 4
    assert parse_config(_document("http://127.0.0.1:9")).workers == 1
    assert parse_config(_document("http://127.0.0.1:9", shared_table="prod-1")).shared_table == "prod-1"


@pytest.mark.parametrize("workers", ["0", "64"])
def test_serve_refuses_a_bad_workers_flag(workers: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_main(["--backend", "http://127.0.0.1:9", "--workers", workers]) == 2
    assert capsys.readouterr().err.strip() == f"irmiddleware serve: --workers must be in 1..63, got {workers}"


def test_bench_proxy_refuses_bad_worker_counts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        bench_proxy_main(["--workers", "1,0"])
    assert exited.value.code == 2
    assert "--workers wants counts in 1..63 like 1,2,4, got '1,0'" in capsys.readouterr().err


def test_the_example_file_parses_with_its_workers_key() -> None:
    assert load_config(EXAMPLE).workers == 1


def test_a_forgotten_backend_s_slot_is_not_routed_to_once_reused(shared_name: str) -> None:
    # The protocol of `serve --workers` (serve/_board.py): a worker forgets a removed backend
    # before the supervisor may add the next one, which can take its slot.
    with (
        Router("round_robin", shared_memory=shared_name, max_accelerators=2) as writer,
        Router("round_robin", shared_memory=shared_name) as follower,
    ):
        writer.add_accelerator(Accelerator(0, 4))
        writer.add_accelerator(Accelerator(1, 4))
        follower.set_pool("m", [0, 1])
        writer.set_state(1, "draining")
        writer.remove_accelerator(1)
        follower.forget_accelerator(1)
        writer.add_accelerator(Accelerator(2, 4))  # the table holds 2: this is the freed slot
        leases = [follower.acquire(pool="m") for _ in range(4)]
        assert [lease.accelerator_id if lease else None for lease in leases] == [0] * 4
        for lease in leases:
            assert lease is not None
            lease.release()
        follower.set_pool("m", [0, 2])  # the new backend, once followed, is routed to by its id
        lease = follower.acquire_on(2)
        assert lease is not None and lease.accelerator_id == 2
        lease.release()


def test_rate_buckets_on_a_shared_table_are_one_bucket_per_tenant(shared_name: str) -> None:
    first, second = FleetRates(shared_name), FleetRates(shared_name)  # as two processes would
    try:
        taken = [rates.take("team-a", 1.0, 3, 100.0) for rates in (first, second, first, second)]
        assert taken == [3, 2, 1, 0]  # the tokens before each take: the fourth found none
        assert first.take("team-a", 1.0, 3, 101.5) == 1.5  # refilled at 1 per second
        assert second.take("team-b", 1.0, 3, 101.5) == 3  # another tenant has a bucket of its own
    finally:
        first.close()
        second.close()
        remove_rates_file(shared_name)


def test_the_release_watcher_wakes_the_loop_when_another_router_releases(shared_name: str) -> None:
    async def scenario(writer: Router, watched: Router) -> None:
        woken, waiting = asyncio.Event(), [True]
        watcher = ReleaseWatcher(watched, woken.set, lambda: waiting[0])
        lease = writer.acquire_on(0)
        assert lease is not None
        watcher.ensure(asyncio.get_running_loop())
        await asyncio.wait_for(woken.wait(), 5)  # once at its start
        woken.clear()
        lease.release()  # in another router: only the table's futex tells the watcher
        await asyncio.wait_for(woken.wait(), 5)
        waiting[0] = False
        watcher.close()
        assert not [t for t in threading.enumerate() if t.name == "irm-release-watch"]

    with (
        Router(shared_memory=shared_name, max_accelerators=2) as writer,
        Router(shared_memory=shared_name) as watched,
    ):
        writer.add_accelerator(Accelerator(0, 1))
        asyncio.run(scenario(writer, watched))
