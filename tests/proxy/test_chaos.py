"""Chaos: a router process in front of four vLLM emulator processes takes 10,000 requests, half of
them streamed, 64 at a time, while clients hang up mid-stream, one backend is killed and restarted,
one hangs past the router's read timeout, and one answers 429, then 503, then 500 for a while.

It ends with:
- no request lost that a healthy backend could have served within the admission deadline: the
  router never answers a 502/503 of its own (connect_error, no_capacity, no_healthy_backend) or
  relays an overload answer; every failure a client sees is one a faulty backend made while faulty
  (a stream cut by the killed backend, a timeout on the hung one, the 500s), and the router counted
  each, on that backend: its access log (one JSON line per request id) says of every request what
  its client saw, and its metrics count what its access log says;
- 0 requests in flight and 0 load in the router's /irm/status, and an empty admission queue;
- no backend ever had more requests in progress than its capacity, as the backend itself counted
  them (`/_emulator/stats`: a request is in progress from its arrival until the engine noticed its
  client had gone and stopped);
- no backend received a request (its `x-request-id`) twice.

The killed backend's counters are read just before it is killed (a process keeps no counters past
SIGKILL); its restarted process is checked at the end like the others. The load is bounded in count
and each wait by a deadline; nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from irmiddleware.testing import wait_until

pytestmark = pytest.mark.slow  # starts five processes and sends 10,000 requests

REQUESTS = 10_000
CONCURRENCY = 64
CAPACITY = 8
KILLED, HUNG, FAILING, STEADY = range(4)
# Request count at which each fault starts or ends (progress, not time: the machine may be slow).
FAULTS = (
    (1_500, "kill", KILLED, None),
    (2_500, "configure", HUNG, {"time_per_request_s": 3.0}),  # 3 s prefill, read_s is 1 s
    (3_500, "configure", FAILING, {"fail_status": 429}),
    (4_500, "restart", KILLED, None),
    (5_000, "configure", HUNG, {"time_per_request_s": 0.0}),
    (5_500, "configure", FAILING, {"fail_status": 503}),
    (6_500, "configure", FAILING, {"fail_status": 500}),
    (6_700, "configure", FAILING, {"fail_status": None}),
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class Processes:
    """The emulator and router processes; each one's output goes to a file (a full pipe would
    block it)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ports = [free_port() for _ in range(4)]
        self.urls = [f"http://127.0.0.1:{port}" for port in self.ports]
        self.backends: list[subprocess.Popen[bytes] | None] = [None] * 4
        self.router: subprocess.Popen[bytes] | None = None
        self.router_url = ""

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.directory / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        command = [sys.executable, "-m", "irmiddleware", *args]
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def start_backend(self, index: int) -> None:
        self.backends[index] = self._spawn(
            f"backend{index}",
            *("emulate", "vllm", "--port", str(self.ports[index]), "--model", "m", "--seed", str(index)),
            *("--concurrency", str(CAPACITY), "--time-per-output-token", "0.02"),
        )
        wait_until(lambda: answers(f"{self.urls[index]}/health"), f"backend {index} up", timeout_s=30)

    def kill_backend(self, index: int) -> None:
        process = self.backends[index]
        assert process is not None
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def start_router(self) -> None:
        port = free_port()
        config = self.directory / "router.toml"
        config.write_text(router_toml(port, self.urls))
        self.router = self._spawn(
            "router",
            *("serve", "--config", str(config), "--log-level", "warning"),
            *("--log-format", "json", "--access-log"),
        )
        self.router_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: answers(f"{self.router_url}/irm/status"), "router up", timeout_s=30)

    def stop(self) -> None:
        for process in [self.router, *self.backends]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=10)


def router_toml(port: int, urls: list[str]) -> str:
    backends = "".join(
        f'[[backends]]\nurl = "{url}"\ncapacity = {CAPACITY}\nmodels = ["m"]\n\n' for url in urls
    )
    return f"""
[router]
listen = "127.0.0.1:{port}"

[router.timeouts]
connect_s = 1.0
read_s = 1.0
abort_grace_s = 0.5

[router.retries]
connect_attempts = 3

[router.health]
interval_s = 0.2
timeout_s = 0.5
healthy_threshold = 2
unhealthy_threshold = 2

[router.outliers]
base_ejection_s = 0.5
max_ejection_s = 2.0
overload_penalty_s = 0.2

[router.signals]
enabled = false

[admission]
max_queue = 10000
max_wait_s = 30

{backends}"""


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.stop()


# ---- the load ---------------------------------------------------------------------------------


async def one_request(client: httpx.AsyncClient, number: int) -> str:
    """Sends request `number` and says how it ended: "ok", "hung_up" (this client left mid-stream
    on purpose), "cut" (a stream that broke off), or "status <code>: <message>"."""
    stream = number % 2 == 1
    hangs_up = number % 20 == 1  # a longer stream, left after its first event
    tokens = 50 if hangs_up else 3
    body = {
        "model": "m",
        "prompt": f"chaos {number}",
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    headers = {"x-request-id": f"chaos-{number}"}
    try:
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                return f"status {response.status_code}: {response.text[:200]}"
            if not stream:
                await response.aread()
                return "ok" if response.json()["choices"] else "bad body"
            lines = [line async for line in until_hang_up(response, number)]
    except httpx.TransportError as error:
        return f"cut: {error!r}"
    if hangs_up:
        return "hung_up"
    return "ok" if lines and lines[-1] == "data: [DONE]" else "cut: no [DONE]"


async def until_hang_up(response: httpx.Response, number: int) -> Any:
    count = 0
    async for line in response.aiter_lines():
        if line:
            yield line
            count += 1
            if number % 20 == 1 and count == 1:
                return  # leave mid-stream: closing the response hangs up


class Load:
    """Sends the requests, `CONCURRENCY` at a time, and applies the faults as it goes."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.results: dict[int, str] = {}
        self.killed_stats: dict[str, Any] = {}
        self._next = 0
        self._faults = list(FAULTS)

    async def run(self) -> None:
        # Idle connections expire on the client's side first (the router's server closes them
        # after 5 s, httpx's default expiry): a client must not race the server's idle close.
        limits = httpx.Limits(
            max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY, keepalive_expiry=1.0
        )
        timeout = httpx.Timeout(60.0)
        async with httpx.AsyncClient(
            base_url=self.processes.router_url, limits=limits, timeout=timeout
        ) as client:
            await asyncio.gather(*(self._worker(client) for _ in range(CONCURRENCY)))

    async def _worker(self, client: httpx.AsyncClient) -> None:
        while self._next < REQUESTS:
            number, self._next = self._next, self._next + 1
            while self._faults and number >= self._faults[0][0]:
                await self._fault(*self._faults.pop(0)[1:])
            self.results[number] = await one_request(client, number)

    async def _fault(self, action: str, index: int, changes: dict[str, Any] | None) -> None:
        url = self.processes.urls[index]
        if action == "kill":
            self.killed_stats = await asyncio.to_thread(lambda: httpx.get(f"{url}/_emulator/stats").json())
            await asyncio.to_thread(self.processes.kill_backend, index)
        elif action == "restart":
            await asyncio.to_thread(self.processes.start_backend, index)
        else:
            answer = await asyncio.to_thread(httpx.post, f"{url}/_emulator/config", json=changes)
            assert answer.status_code == 200, answer.text


# ---- the checks --------------------------------------------------------------------------------


def router_counts(router_url: str, name: str, label: str) -> dict[tuple[str, str], float]:
    """The non-zero samples of the router's counter `name`, summed by (backend, `label`) over its
    other labels (`irm_requests_total` also has `model` and `status_class`)."""
    counted: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{router_url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.value:
                key = (sample.labels["backend"], sample.labels[label])
                counted[key] = counted.get(key, 0.0) + sample.value
    return counted


def access_outcomes(processes: Processes) -> dict[int, str]:
    """Request number → the outcome in the router's access-log line for it (one line each)."""
    outcomes: dict[int, str] = {}
    for line in (processes.directory / "router.log").read_text().splitlines():
        record = json.loads(line)
        if record["logger"] == "irmiddleware.access":
            number = int(record["request_id"].removeprefix("chaos-"))
            assert number not in outcomes, record  # written once per request
            outcomes[number] = record["outcome"]
    return outcomes


# What the router may have logged for what the client saw. A client that hangs up mid-stream
# races its backend's fault: whichever the router noticed first is its outcome.
ROUTER_OUTCOMES = {
    "ok": {"ok"},
    "cut": {"upstream_error", "timeout"},
    "status 500": {"backend_error"},
    "status 504": {"timeout"},
    "hung_up": {"client_disconnected", "ok", "upstream_error", "timeout"},
}


def assert_the_faults_bit(processes: Processes, outcomes: dict[tuple[str, str], float]) -> None:
    """Each fault reached requests, so passing says something: the hung backend timed some out,
    the failing one answered 500s, overload answers and the killed backend caused retries."""
    urls = processes.urls
    assert outcomes.get((urls[HUNG], "timeout"), 0) > 0, outcomes
    assert outcomes.get((urls[FAILING], "backend_error"), 0) > 0, outcomes
    retries = router_counts(processes.router_url, "irm_retries_total", "reason")
    assert retries.get((urls[FAILING], "overloaded"), 0) > 0, retries
    assert any(backend == urls[KILLED] for backend, _ in retries), retries


def assert_nothing_lost(
    results: dict[int, str], outcomes: dict[tuple[str, str], float], urls: list[str], logged: dict[int, str]
) -> None:
    kinds = collections.Counter(result.split(":")[0] for result in results.values())
    assert len(results) == REQUESTS
    assert set(kinds) <= {"ok", "hung_up", "cut", "status 500", "status 504"}, kinds
    # Every 20th request hangs up after its first event, unless its backend failed it first.
    hangers = [results[n] for n in range(1, REQUESTS, 20)]
    assert all(r == "hung_up" or not r.startswith("ok") for r in hangers), hangers
    for result in results.values():
        if result.startswith("status 500"):
            assert "Emulated failure" in result, result  # the failing backend's own answer
    by_outcome = collections.Counter[str]()
    for (backend, outcome), count in outcomes.items():
        by_outcome[outcome] += int(count)
        allowed = {"ok", "client_disconnected"}
        allowed |= {
            urls[KILLED]: {"upstream_error"},
            urls[HUNG]: {"timeout"},
            urls[FAILING]: {"backend_error"},
        }.get(backend, set())
        assert outcome in allowed, (backend, outcome, count)
    assert sorted(logged) == list(range(REQUESTS))
    mismatched = [
        (number, result, logged[number])
        for number, result in results.items()
        if logged[number] not in ROUTER_OUTCOMES[result.split(":")[0]]
    ]
    assert mismatched == [], mismatched[:10]
    assert by_outcome == collections.Counter(logged.values())  # metrics and access log agree
    # A client that hangs up after the end was relayed leaves an "ok" behind; most leave mid-stream.
    assert kinds["hung_up"] / 2 <= by_outcome["client_disconnected"] <= kinds["hung_up"]
    assert sum(by_outcome.values()) == REQUESTS


def assert_idle_and_within_capacity(processes: Processes, killed_stats: dict[str, Any]) -> None:
    def idle() -> bool:
        status = httpx.get(f"{processes.router_url}/irm/status").json()
        busy = [(b["requests_in_flight"], b["load"]) for b in status["backends"]]
        return busy == [(0, 0)] * 4 and status["admission"]["waiting"] == 0

    wait_until(idle, "router idle (in flight 0, load 0, nobody waiting)", timeout_s=10)
    every = [killed_stats]
    for url in processes.urls:
        stats = httpx.get(f"{url}/_emulator/stats").json()
        wait_until(lambda u=url: httpx.get(f"{u}/_emulator/stats").json()["in_progress"] == 0, "backend idle")
        every.append(stats)
    for stats in every:
        assert stats["peak_in_progress"] <= CAPACITY, stats
        assert stats["repeated_ids"] == 0, stats  # at most once per backend


def test_chaos_loses_nothing_a_healthy_backend_could_serve(processes: Processes) -> None:
    for index in range(4):
        processes.start_backend(index)
    processes.start_router()
    load = Load(processes)
    asyncio.run(load.run())
    assert load.killed_stats["received"] > 0  # the kill happened with traffic on it
    with contextlib.suppress(AssertionError):
        wait_until(lambda: answers(f"{processes.urls[KILLED]}/health"), "restarted", timeout_s=5)
    outcomes = router_counts(processes.router_url, "irm_requests_total", "outcome")
    assert_the_faults_bit(processes, outcomes)
    assert_nothing_lost(load.results, outcomes, processes.urls, access_outcomes(processes))
    assert_idle_and_within_capacity(processes, load.killed_stats)
