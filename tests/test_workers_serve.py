"""`irmiddleware serve --workers N` as real processes, in front of real vLLM emulators, driven by
real httpx clients: a backend the supervisor's health checks take out is out for every worker, and
back for every worker when it recovers; a backend one worker ejects is ejected for all; with 2 and
4 workers under load, no backend ever holds more requests than its capacity (the emulators count
their peak), every request is answered, one metrics scrape shows the total of all workers, and the
table is back to zero at the end; a request waiting in a worker is served when capacity is freed
in another process; a tenant's limit holds across the workers; a worker killed with `kill -9`
while streams are in flight has its reservations given back, the streams of the other workers
finish without an error and a replacement starts; workers killed six times under load leave the
table exactly at zero, never above capacity; `--workers 1` runs no other process; owner indexes
are held per process and freed when it dies; and the drop-in middleware keeps capacity global
inside `uvicorn --workers 2` given `[router] shared_table`. Every wait is bounded; nothing asserts
on wall-clock time."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from irmiddleware import Router, unlink_shared
from irmiddleware.proxy._shared import held_lock, remove_lock_file, tenants_table
from irmiddleware.testing import create_vllm_app, serve_in_thread, wait_until

pytestmark = pytest.mark.slow  # starts supervisors, workers and uvicorn processes

TOKENS = {"time_per_request_s": 0.0, "time_per_prompt_token_s": 0.0, "time_per_output_token_s": 0.002}
SLOW = {**TOKENS, "time_per_output_token_s": 0.01}
_EXITED = (0, -signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_config(path: Path, urls: list[str], capacity: int, admission: str = "") -> Path:
    backends = "".join(
        f'[[backends]]\nurl = "{url}"\ntype = "vllm"\ncapacity = {capacity}\nmodels = ["m"]\n\n'
        for url in urls
    )
    path.write_text(f"{backends}[admission]\nmax_queue = 512\nmax_wait_s = 30.0\n{admission}")
    return path


def children(pid: int) -> list[int]:
    """The processes `pid` started and that still run (Linux)."""
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return [int(child) for child in file.read().split()]


@contextlib.contextmanager
def serving(config: Path, workers: int) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`irmiddleware serve --config CONFIG --workers N` on a free port, once its N workers run
    and it answers; SIGTERM at the end, which must end it cleanly."""
    port = _free_port()
    command = [sys.executable, "-m", "irmiddleware", "serve", "--config", str(config), "--workers",
               str(workers), "--listen", f"127.0.0.1:{port}", "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(command, text=True)
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/ready", timeout=1).status_code == 200
            return False

        wait_until(ready, "the router answers", timeout_s=60)
        wait_until(lambda: len(children(process.pid)) == workers, "every worker runs", timeout_s=30)
        yield process, url
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) in _EXITED
        assert not glob.glob(f"/dev/shm/irm-serve-{process.pid}-*"), "the supervisor removed its table"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@contextlib.contextmanager
def _router_of(
    apps: list[Any], tmp_path: Path, capacity: int, extra: str = "", workers: int = 2
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """The emulators `apps` served, and `serve --workers N` in front of them at `capacity` each."""
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(serve_in_thread(app)).url for app in apps]
        yield stack.enter_context(serving(_write_config(tmp_path / "r.toml", urls, capacity, extra), workers))


def _body(stream: bool, tokens: int = 20) -> dict[str, Any]:
    return {"model": "m", "prompt": "Hello", "max_tokens": tokens, "ignore_eos": True, "stream": stream}


async def _load(url: str, clients: int, each: int, headers: dict[str, str] | None = None) -> list[int]:
    """`clients` concurrent clients (one connection each), `each` requests apiece, half of them
    streamed; the statuses."""

    async def client(index: int) -> list[int]:
        statuses = []
        async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as http:
            for number in range(each):
                async with http.stream(
                    "POST", "/v1/completions", json=_body((index + number) % 2 == 0)
                ) as answer:
                    async for _chunk in answer.aiter_raw():
                        pass
                statuses.append(answer.status_code)
        return statuses

    results = await asyncio.gather(*(client(index) for index in range(clients)))
    return [status for statuses in results for status in statuses]


def _status(url: str) -> dict[str, Any]:
    status: dict[str, Any] = httpx.get(f"{url}/irm/status", timeout=5).json()
    return status


def _table_load(url: str) -> int:
    return sum(backend["load"] for backend in _status(url)["backends"])


def _requests_total(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    return sum(
        sample.value for sample in families["irm_requests"].samples if sample.name == "irm_requests_total"
    )


@pytest.mark.parametrize("workers", [2, 4])
def test_workers_under_load_never_exceed_capacity(workers: int, tmp_path: Path) -> None:
    apps = [create_vllm_app(served_model_names=("m",), max_num_seqs=64, **TOKENS) for _ in range(2)]
    with _router_of(apps, tmp_path, 3, workers=workers) as (_, url):
        statuses = asyncio.run(_load(url, clients=24, each=10))
        assert statuses == [200] * 240
        peaks = [app.state.emulator.stats.peak_in_progress for app in apps]
        assert max(peaks) == 3  # saturated, and never above the capacity of 3
        assert sum(app.state.emulator.stats.completed for app in apps) == 240
        wait_until(lambda: _table_load(url) == 0, "the table is back to zero")
        # One scrape, whichever worker answers it: the total of every worker.
        wait_until(lambda: _requests_total(url) == 240, "the metrics count every worker's requests")


def test_the_supervisors_health_checks_reach_every_worker(tmp_path: Path) -> None:
    apps = [create_vllm_app(served_model_names=("m",), max_num_seqs=64, **TOKENS) for _ in range(2)]
    checks = "[router.health]\ninterval_s = 0.1\nunhealthy_threshold = 1\nhealthy_threshold = 1\n"
    with _router_of(apps, tmp_path, 4, checks) as (_, url):
        apps[0].state.emulator.reconfigure(unhealthy=True)

        def every_worker_sees(state: str) -> bool:
            # Fresh connections reach either worker: each must report it.
            return all(_status(url)["backends"][0]["state"] == state for _ in range(8))

        wait_until(lambda: every_worker_sees("down"), "the backend is down for every worker")
        served_before = apps[0].state.emulator.stats.completed
        statuses = asyncio.run(_load(url, clients=8, each=5))
        assert statuses == [200] * 40
        assert apps[0].state.emulator.stats.completed == served_before  # no worker sent it any
        apps[0].state.emulator.reconfigure(unhealthy=False)
        wait_until(lambda: every_worker_sees("active"), "the backend is back for every worker")


def test_a_backend_one_worker_ejects_is_ejected_for_every_worker(tmp_path: Path) -> None:
    apps = [create_vllm_app(served_model_names=("m",), max_num_seqs=64, **TOKENS) for _ in range(2)]
    # Health checks pass (its /health answers 200) while its answers fail: only traffic tells.
    ejection = "[router.outliers]\nconsecutive_errors = 1\nbase_ejection_s = 60.0\n"
    with _router_of(apps, tmp_path, 4, ejection) as (_, url):
        apps[0].state.emulator.reconfigure(fail_status=500)
        with httpx.Client(base_url=url, timeout=30) as one_connection:  # one worker sees it all
            for _ in range(10):
                one_connection.post("/v1/completions", json=_body(False))
        wait_until(
            lambda: all(_status(url)["backends"][0]["state"] == "down" for _ in range(8)),
            "the ejection is in the table, for every worker",
        )


def test_a_waiter_is_served_when_another_process_frees_capacity(tmp_path: Path) -> None:
    app = create_vllm_app(served_model_names=("m",), **TOKENS)
    with _router_of([app], tmp_path, 1) as (supervisor, url):
        (table,) = [
            Path(path).name.removeprefix("irm-")
            for path in glob.glob(f"/dev/shm/irm-serve-{supervisor.pid}-*")
            if "." not in Path(path).name  # not its files beside it (owners, tenants, fleet)
        ]
        with Router(shared_memory=table) as outsider:
            lease = outsider.acquire_on(0)  # the backend's one unit, held by another process
            assert lease is not None
            results: list[int] = []
            waiter = threading.Thread(
                target=lambda: results.append(
                    httpx.post(f"{url}/v1/completions", json=_body(False), timeout=30).status_code
                )
            )
            waiter.start()
            # Each new connection may reach another worker: poll until one reports the waiter.
            wait_until(lambda: _status(url)["admission"]["waiting"] == 1, "the request waits in a worker")
            released_at = time.perf_counter()
            lease.release()
            waiter.join(30)
            served_ms = 1000 * (time.perf_counter() - released_at)
            print(f"served {served_ms:.1f} ms after the release (answer included)")
        assert results == [200]
        assert app.state.emulator.stats.peak_in_progress == 1


def test_a_tenant_limit_holds_across_workers(tmp_path: Path) -> None:
    app = create_vllm_app(served_model_names=("m",), max_num_seqs=64, **SLOW)
    limits = "[admission.tenant_defaults]\nmax_concurrency = 2\n"
    with _router_of([app], tmp_path, 16, limits) as (_, url):
        team = {"authorization": "Bearer team-a"}
        with contextlib.ExitStack() as streams:
            held = []  # the line iterators: dropping one closes its stream
            for _ in range(2):
                answer = streams.enter_context(
                    httpx.stream(
                        "POST", f"{url}/v1/completions", json=_body(True, 2000), headers=team, timeout=30
                    )
                )
                held.append(answer.iter_lines())
                next(held[-1])
            # Fresh connections: they reach either worker.
            over = [
                httpx.post(f"{url}/v1/completions", json=_body(False, 2), headers=team).status_code
                for _ in range(8)
            ]
            other = httpx.post(
                f"{url}/v1/completions", json=_body(False, 2), headers={"authorization": "Bearer b"}
            )
        assert over == [429] * 8
        assert other.status_code == 200
        wait_until(lambda: _table_load(url) == 0, "the streams ended")
        answer = httpx.post(f"{url}/v1/completions", json=_body(False, 2), headers=team)
        assert answer.status_code == 200


def _connections(pid: int, port: int) -> int:
    """Established connections of process `pid` on local `port` (Linux: its socket inodes in
    /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    count = 0
    with open("/proc/net/tcp") as file:
        for line in file.readlines()[1:]:
            fields = line.split()
            local_port, state, inode = int(fields[1].rpartition(":")[2], 16), fields[3], fields[9]
            count += local_port == port and state == "01" and inode in inodes
    return count


def test_kill_9_of_a_worker_gives_back_its_reservations(tmp_path: Path) -> None:
    app = create_vllm_app(served_model_names=("m",), max_num_seqs=64, **SLOW)
    with _router_of([app], tmp_path, 32) as (supervisor, url), contextlib.ExitStack() as stack:
        port = int(url.rpartition(":")[2])
        streams = []
        for _ in range(24):  # until both workers hold some (the kernel picks who accepts)
            answer = stack.enter_context(httpx.stream("POST", f"{url}/v1/completions", json=_body(True, 300)))
            streams.append((answer, answer.iter_lines()))
            next(streams[-1][1])
            held = {pid: _connections(pid, port) for pid in children(supervisor.pid)}
            if len(streams) >= 6 and all(held.values()):
                break
        victim, survivor = sorted(held, key=held.__getitem__)
        assert held[victim] and held[survivor]
        os.kill(victim, signal.SIGKILL)
        # What the victim held comes back; the survivor's streams still count.
        wait_until(lambda: _table_load(url) == held[survivor], "the dead worker's reservations came back")
        wait_until(
            lambda: victim not in (running := children(supervisor.pid)) and len(running) == 2,
            "a replacement runs",
        )
        finished, broken = 0, 0
        for _answer, lines in streams:
            try:
                finished += [line for line in lines if line][-1] == "data: [DONE]"
            except httpx.HTTPError:
                broken += 1
        assert (finished, broken) == (held[survivor], held[victim])
        wait_until(lambda: _table_load(url) == 0, "the table is back to zero")


async def _load_through_kills(url: str, clients: int, each: int) -> tuple[int, int]:
    """Like `_load`, counting answers and errors: a client of a killed worker sees its connection
    drop, and goes on with a new one."""
    ok = errors = 0

    async def client() -> None:
        nonlocal ok, errors
        for number in range(each):
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                try:
                    async with http.stream("POST", "/v1/completions", json=_body(number % 2 == 0)) as answer:
                        async for _chunk in answer.aiter_raw():
                            pass
                    ok += answer.status_code == 200
                except httpx.HTTPError:
                    errors += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    return ok, errors


def test_workers_killed_again_and_again_under_load_leave_the_table_exact(tmp_path: Path) -> None:
    app = create_vllm_app(served_model_names=("m",), max_num_seqs=64, **TOKENS)
    with _router_of([app], tmp_path, 4) as (supervisor, url):
        stop = threading.Event()

        port = int(url.rpartition(":")[2])

        def serving_workers() -> list[int]:
            return [pid for pid in children(supervisor.pid) if _connections(pid, port)]

        def killer() -> None:
            for _ in range(6):  # a worker with requests under way, killed at whatever it was doing
                if stop.wait(0.3):
                    return
                with contextlib.suppress(AssertionError):
                    wait_until(lambda: len(serving_workers()) == 2, "both workers serve", timeout_s=20)
                victims = serving_workers()
                if victims:
                    os.kill(victims[0], signal.SIGKILL)

        thread = threading.Thread(target=killer)
        thread.start()
        try:
            ok, errors = asyncio.run(_load_through_kills(url, clients=16, each=25))
        finally:
            stop.set()
            thread.join(60)
        assert ok + errors == 400 and ok > errors
        assert app.state.emulator.stats.peak_in_progress <= 4
        wait_until(lambda: _table_load(url) == 0, "every reservation came back, none twice")
        assert _status(url)["backends"][0]["requests_in_flight"] == 0


def test_one_worker_serves_from_one_process(tmp_path: Path) -> None:
    app = create_vllm_app(served_model_names=("m",), **TOKENS)
    with serve_in_thread(app) as backend:
        port = _free_port()
        config = _write_config(tmp_path / "r.toml", [backend.url], 4)
        command = [sys.executable, "-m", "irmiddleware", "serve", "--config", str(config), "--workers", "1",
                   "--listen", f"127.0.0.1:{port}", "--log-level", "warning"]  # fmt: skip
        process = subprocess.Popen(command)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: _answers(url), "the router answers", timeout_s=30)
            assert children(process.pid) == []
            assert httpx.post(f"{url}/v1/completions", json=_body(False)).status_code == 200
            process.send_signal(signal.SIGTERM)
            assert process.wait(20) in _EXITED
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def _answers(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/ready", timeout=1).status_code == 200
    return False


_CLAIM = """
import sys, time
from irmiddleware.proxy._shared import claim
print(claim(sys.argv[1]).owner, flush=True)
time.sleep(60)
"""


def test_owner_indexes_are_held_per_process_and_freed_at_death() -> None:
    table = f"test-owners-{secrets.token_hex(4)}"
    started: list[subprocess.Popen[str]] = []

    def claimant() -> int:
        process = subprocess.Popen([sys.executable, "-c", _CLAIM, table], stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout is not None
        return int(process.stdout.readline())

    try:
        assert (claimant(), claimant()) == (1, 2)
        with held_lock(table, 1) as free:
            assert not free
        started[0].kill()
        started[0].wait(10)
        with held_lock(table, 1) as free:
            assert free
        assert claimant() == 1  # the lowest free index again
    finally:
        for process in started:
            process.kill()
            process.wait(10)
        remove_lock_file(table)


_DROP_IN = """
from irmiddleware.proxy import RoutingMiddleware, parse_config

async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})

config = parse_config({
    "router": {"shared_table": TABLE},
    "backends": [{"url": URL, "type": "vllm", "capacity": 2, "models": ["m"]}],
    "admission": {"max_queue": 512, "max_wait_s": 30.0},
})
app = RoutingMiddleware(app, config)
"""


def test_the_drop_in_middleware_keeps_capacity_global_in_uvicorn_workers(tmp_path: Path) -> None:
    table = f"test-dropin-{secrets.token_hex(4)}"
    app = create_vllm_app(served_model_names=("m",), max_num_seqs=64, **TOKENS)
    with serve_in_thread(app) as backend:
        (tmp_path / "routed.py").write_text(f"TABLE = {table!r}\nURL = {backend.url!r}\n{_DROP_IN}")
        port = _free_port()
        command = [sys.executable, "-m", "uvicorn", "routed:app", "--app-dir", str(tmp_path),
                   "--workers", "2", "--port", str(port), "--log-level", "warning"]  # fmt: skip
        process = subprocess.Popen(command)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: _answers(url), "uvicorn's workers answer", timeout_s=60)
            wait_until(lambda: len(children(process.pid)) >= 2, "both workers run", timeout_s=30)
            statuses = asyncio.run(_load(url, clients=16, each=10))
            assert statuses == [200] * 160
            assert app.state.emulator.stats.peak_in_progress == 2
            wait_until(lambda: _table_load(url) == 0, "the table is back to zero")
        finally:
            process.terminate()
            process.wait(30)
            for name in (table, tenants_table(table)):
                with contextlib.suppress(OSError):
                    unlink_shared(name)
                remove_lock_file(name)
