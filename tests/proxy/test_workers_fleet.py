"""The fleet of `irmiddleware serve --workers 2` changes live, as with one worker, and every worker
follows it: a backend added through the admin API serves requests from both workers as soon as the
add is answered; under a load through both workers that loses no request, a backend drained and
removed gets no request afterwards, and a backend added next serves from both; SIGHUP with a
changed file adds and removes backends in both workers; `[[discovery]]` against a real DNS server
(dnslib's) adds the addresses it lists and removes one it drops, for both workers. A tenant's rate
limit is one limit for both workers: a burst through both admits exactly the bucket's tokens. Real
processes (the supervisor, its workers, vLLM emulators) driven by real httpx clients, each client's
connection held by a known worker. Every wait is bounded; nothing asserts on wall-clock time."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from admin_support import LoadLoop
from test_discovery import ADDRESSES, NAME, Zone, common_free_port, dns
from test_workers_serve import _connections, _free_port, children, serving

from irmiddleware.testing import create_vllm_app, serve_in_thread, wait_until

pytestmark = pytest.mark.slow  # starts supervisors, workers and emulators

TOKEN = "fleet-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
FAST = {"time_per_request_s": 0.0, "time_per_prompt_token_s": 0.0, "time_per_output_token_s": 0.001}


def _backend(url: str, model: str) -> str:
    return f'[[backends]]\nurl = "{url}"\ntype = "vllm"\ncapacity = 4\nmodels = ["{model}"]\n\n'


def _config(path: Path, admin: str, backends: dict[str, str], extra: str = "") -> Path:
    """A router file: `backends` (URL -> model), requests may wait, the admin listener at `admin`,
    fast health checks."""
    body = "".join(_backend(url, model) for url, model in backends.items())
    path.write_text(
        f"{body}[admission]\nmax_queue = 64\nmax_wait_s = 30.0\n\n{extra}"
        "[router.health]\ninterval_s = 0.2\n\n"
        f'[admin]\nlisten = "{admin}"\ntoken_env = "IRM_FLEET_TEST_TOKEN"\n'
    )
    return path


@contextlib.contextmanager
def _serve(path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    os.environ["IRM_FLEET_TEST_TOKEN"] = TOKEN
    try:
        with serving(path, 2) as served:
            yield served
    finally:
        del os.environ["IRM_FLEET_TEST_TOKEN"]


@contextlib.contextmanager
def _per_worker(supervisor: subprocess.Popen[str], url: str) -> Iterator[list[httpx.Client]]:
    """One client per worker, each on one kept-alive connection that worker accepted (new
    connections are opened until each worker holds one; the kernel picks who accepts)."""
    port = int(url.rpartition(":")[2])
    with contextlib.ExitStack() as stack:
        owned: dict[int, httpx.Client] = {}
        for _ in range(64):
            before = {pid: _connections(pid, port) for pid in children(supervisor.pid)}
            client = stack.enter_context(httpx.Client(base_url=url, timeout=30))
            client.get("/v1/models").raise_for_status()
            grown = [pid for pid in before if _connections(pid, port) > before[pid]]
            if len(grown) == 1 and grown[0] not in owned:
                owned[grown[0]] = client
            if len(owned) == 2:
                break
        assert len(owned) == 2, "each worker holds a connection"
        yield list(owned.values())


def _models(client: httpx.Client) -> set[str]:
    return {entry["id"] for entry in client.get("/v1/models").json()["data"]}


def _complete(client: httpx.Client, model: str, headers: dict[str, str] | None = None) -> int:
    body = {"model": model, "prompt": "Hello", "max_tokens": 4, "ignore_eos": True}
    return client.post("/v1/completions", json=body, headers=headers).status_code


def _emulator(model: str) -> Any:
    return create_vllm_app(served_model_names=(model,), max_num_seqs=64, **FAST)


def _fleet(admin: str) -> dict[str, str]:
    """The supervisor's backends: URL -> state."""
    answer = httpx.get(f"{admin}/admin/backends", timeout=5).json()
    return {backend["url"]: backend["state"] for backend in answer["backends"]}


def test_a_backend_added_through_the_admin_api_serves_from_every_worker(tmp_path: Path) -> None:
    first, added = _emulator("m"), _emulator("m2")
    admin = f"127.0.0.1:{_free_port()}"
    with contextlib.ExitStack() as stack:
        one, two = (stack.enter_context(serve_in_thread(app)) for app in (first, added))
        supervisor, url = stack.enter_context(_serve(_config(tmp_path / "r.toml", admin, {one.url: "m"})))
        clients = stack.enter_context(_per_worker(supervisor, url))
        entry = {"url": two.url, "type": "vllm", "capacity": 4, "models": ["m2"]}
        answer = httpx.post(f"http://{admin}/admin/backends", json=entry, headers=AUTH, timeout=30)
        assert answer.status_code == 201, answer.text
        # Answered once every worker follows: no wait here.
        assert [_models(client) for client in clients] == [{"m", "m2"}] * 2
        assert [_complete(client, "m2") for client in clients for _ in range(3)] == [200] * 6
        assert added.state.emulator.stats.completed == 6
        assert [_complete(client, "m") for client in clients] == [200] * 2


def test_a_backend_removed_under_load_gets_no_request_after_and_the_next_serves(tmp_path: Path) -> None:
    apps = [_emulator("m") for _ in range(3)]
    admin = f"http://127.0.0.1:{_free_port()}"
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(serve_in_thread(app)).url for app in apps]
        path = _config(tmp_path / "r.toml", admin[7:], {urls[0]: "m", urls[1]: "m"})
        supervisor, url = stack.enter_context(_serve(path))
        clients = stack.enter_context(_per_worker(supervisor, url))
        load = LoadLoop(url, threads=6, requests=300)  # one connection each: both workers get some
        with load.running():
            assert httpx.post(f"{admin}/admin/backends/1/drain", headers=AUTH, timeout=5).status_code == 200
            wait_until(lambda: _fleet(admin)[urls[1]] == "drained", "nothing in flight on it", timeout_s=30)
            removed = httpx.delete(f"{admin}/admin/backends/1", headers=AUTH, timeout=5)
            assert removed.status_code == 200, removed.text
            served = apps[1].state.emulator.stats.completed
            entry = {"url": urls[2], "type": "vllm", "capacity": 4, "models": ["m"]}
            added = httpx.post(f"{admin}/admin/backends", json=entry, headers=AUTH, timeout=30)
            assert added.status_code == 201, added.text
            # The first backend drained too: each worker's requests can only go to the new one.
            assert httpx.post(f"{admin}/admin/backends/0/drain", headers=AUTH, timeout=5).status_code == 200
            before = apps[2].state.emulator.stats.completed
            assert [_complete(client, "m") for client in clients for _ in range(3)] == [200] * 6
            assert apps[2].state.emulator.stats.completed >= before + 6
            print(f"{load.done} of {6 * 300} requests of the load answered by then")
        assert load.errors == []
        assert load.statuses == [200] * 6 * 300  # none lost while the fleet changed
        assert apps[1].state.emulator.stats.completed == served  # none after its removal


def test_sighup_with_a_changed_file_changes_every_workers_fleet(tmp_path: Path) -> None:
    first, second = _emulator("m"), _emulator("m2")
    admin = f"127.0.0.1:{_free_port()}"
    with serve_in_thread(first) as one, serve_in_thread(second) as two:
        path = _config(tmp_path / "r.toml", admin, {one.url: "m"})
        with _serve(path) as (supervisor, url), _per_worker(supervisor, url) as clients:
            _config(path, admin, {one.url: "m", two.url: "m2"})
            supervisor.send_signal(signal.SIGHUP)
            wait_until(lambda: all(_models(c) == {"m", "m2"} for c in clients), "every worker has it")
            assert [_complete(client, "m2") for client in clients] == [200] * 2
            _config(path, admin, {one.url: "m"})
            supervisor.send_signal(signal.SIGHUP)
            wait_until(lambda: two.url not in _fleet(f"http://{admin}"), "drained and removed")
            wait_until(lambda: all(_models(c) == {"m"} for c in clients), "every worker forgot it")
            assert [_complete(client, "m2") for client in clients] == [404] * 2
            assert second.state.emulator.stats.completed == 2
            assert len(children(supervisor.pid)) == 2  # SIGHUP ended no worker


def test_discovery_changes_every_workers_fleet(tmp_path: Path) -> None:
    port = common_free_port()
    apps = {address: _emulator("m") for address in ADDRESSES[:2]}
    zone = Zone(ADDRESSES[0])
    admin = f"127.0.0.1:{_free_port()}"
    with contextlib.ExitStack() as stack:
        for address, app in apps.items():
            stack.enter_context(serve_in_thread(app, host=address, port=port))
        resolver = stack.enter_context(dns(zone))
        discovery = (
            f'[[discovery]]\ndns = "{NAME}:{port}"\nresolver = "{resolver}"\ninterval_s = 0.1\n'
            'capacity = 4\nmodels = ["m"]\n\n'
        )
        supervisor, url = stack.enter_context(_serve(_config(tmp_path / "r.toml", admin, {}, discovery)))
        clients = stack.enter_context(_per_worker(supervisor, url))
        assert [_complete(client, "m") for client in clients for _ in range(2)] == [200] * 4
        assert apps[ADDRESSES[0]].state.emulator.stats.completed == 4
        first, second = (f"http://{address}:{port}" for address in ADDRESSES[:2])
        zone.set(*ADDRESSES[:2])  # a second pod: added, and followed before the next resolution
        wait_until(lambda: list(_fleet(f"http://{admin}")) == [first, second], "the second pod joins")
        zone.set(ADDRESSES[1])  # the first pod goes: drained, then removed
        wait_until(lambda: list(_fleet(f"http://{admin}")) == [second], "the first pod leaves")
        served = apps[ADDRESSES[0]].state.emulator.stats.completed
        before = apps[ADDRESSES[1]].state.emulator.stats.completed
        assert [_complete(client, "m") for client in clients for _ in range(2)] == [200] * 4
        assert apps[ADDRESSES[0]].state.emulator.stats.completed == served, f"{first} got a request"
        assert apps[ADDRESSES[1]].state.emulator.stats.completed == before + 4


def test_a_tenant_rate_limit_is_one_limit_for_every_worker(tmp_path: Path) -> None:
    app = _emulator("m")
    # A bucket of 6 tokens refilled at one per 100 s: over the test, the bucket is all there is.
    limits = "[admission.tenant_defaults]\nrate_per_s = 0.01\nburst = 6\n\n"
    admin = f"127.0.0.1:{_free_port()}"
    with serve_in_thread(app) as one:
        path = _config(tmp_path / "r.toml", admin, {one.url: "m"}, limits)
        with _serve(path) as (supervisor, url), _per_worker(supervisor, url) as clients:
            team = {"authorization": "Bearer team-a"}
            burst = [_complete(client, "m", team) for _ in range(6) for client in clients]
            assert burst == [200] * 6 + [429] * 6  # 3 through each worker, then none through either
            assert [_complete(client, "m", {"authorization": "Bearer b"}) for client in clients] == [200] * 2
