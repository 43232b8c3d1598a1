"""Router replicas that share nothing agree where it matters. Two `irmiddleware serve` processes in
front of the same emulated vLLM servers give every session key the same owner, as read on the
backend side (the emulator whose completed count moved): with the same router file (and other
string-hash seeds), with the backends listed in another order, and after a fleet change applied
to both (SIGHUP), including a replica restarted on the new file beside one that reached it by
reloading. Each request is sent alone, so the bounded load never moves a key; every wait is
bounded. And `bench-replicas`, which measures balance across replicas, serves every request it
sends."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import httpx
import pytest

from irmiddleware.bench._harness import local_url
from irmiddleware.bench._replicas import Replica, replica_config, replica_routers
from irmiddleware.testing import VLLMEmulator, create_vllm_app, serve_in_thread, wait_until

pytestmark = pytest.mark.slow  # starts `irmiddleware serve` processes

KEYS = [f"session-{number}" for number in range(48)]


@dataclass(frozen=True)
class Backend:
    url: str
    emulator: VLLMEmulator


@pytest.fixture
def emulators() -> Iterator[list[Backend]]:
    """Five emulated vLLM servers that answer at once (the fifth joins the fleet later)."""
    with contextlib.ExitStack() as stack:
        backends = []
        for _ in range(5):
            app = create_vllm_app(
                served_model_names=("m",),
                time_per_request_s=0.0,
                time_per_prompt_token_s=0.0,
                time_per_output_token_s=0.0,
            )
            backends.append(Backend(stack.enter_context(serve_in_thread(app)).url, app.state.emulator))
        yield backends


def _config(backends: Sequence[Backend], listen: str) -> str:
    return replica_config([backend.url for backend in backends], listen, "consistent_hash", capacity=4)


def _completed(emulators: Sequence[Backend]) -> list[int]:
    return [backend.emulator.stats.completed for backend in emulators]


def _owners(replica: Replica, emulators: Sequence[Backend]) -> dict[str, int]:
    """The emulator that served each key through `replica`, one request at a time."""
    owners = {}
    with httpx.Client(base_url=replica.url, timeout=10) as client:
        for key in KEYS:
            before = _completed(emulators)
            body = {"model": "m", "prompt": "hi", "max_tokens": 1}
            answer = client.post("/v1/completions", json=body, headers={"x-session-id": key})
            assert answer.status_code == 200, answer.text
            moved = [i for i, (a, b) in enumerate(zip(_completed(emulators), before, strict=True)) if a != b]
            assert len(moved) == 1, moved
            owners[key] = moved[0]
    return owners


def _wait_for_fleet(replica: Replica, backends: Sequence[Backend]) -> None:
    wanted = sorted(backend.url for backend in backends)

    def applied() -> bool:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            status = httpx.get(f"{replica.url}/irm/status", timeout=1).json()
            active = [b["url"] for b in status["backends"] if b["state"] == "active"]
            return sorted(active) == wanted and len(status["backends"]) == len(wanted)
        return False

    wait_until(applied, f"{replica.url} applying the new fleet", timeout_s=15)


def test_replicas_with_one_file_give_every_key_the_same_owner(
    emulators: list[Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replicas run with different string-hash seeds: nothing of Python's `hash()` goes in."""
    fleet = emulators[:4]
    with contextlib.ExitStack() as stack:
        replicas = []
        for seed in ("1", "2"):
            monkeypatch.setenv("PYTHONHASHSEED", seed)
            replicas += stack.enter_context(replica_routers([_config(fleet, local_url())]))
        first, second = replicas
        owners = _owners(first, emulators)
        assert _owners(second, emulators) == owners
    assert len(set(owners.values())) >= 3, owners  # the keys spread: the check can tell owners apart


def test_owners_do_not_depend_on_the_order_backends_are_listed(emulators: list[Backend]) -> None:
    fleet = emulators[:4]
    configs = [_config(fleet, local_url()), _config(fleet[::-1], local_url())]
    with replica_routers(configs) as (first, second):
        assert _owners(second, emulators) == _owners(first, emulators)


def test_owners_agree_after_a_fleet_change_on_both(emulators: list[Backend]) -> None:
    """Both replicas drop backend 1 and add backend 4 by SIGHUP; then a third replica starts on
    the new file (as after a rolling restart). Only the keys of the changed backends move."""
    old, new = emulators[:4], [emulators[0], *emulators[2:5]]
    with replica_routers([_config(old, local_url()) for _ in range(2)]) as replicas:
        before = _owners(replicas[0], emulators)
        for replica in replicas:
            replica.reload(_config(new, replica.url))
            _wait_for_fleet(replica, new)
        after = _owners(replicas[0], emulators)
        assert _owners(replicas[1], emulators) == after
        with replica_routers([_config(new, local_url())]) as (restarted,):
            assert _owners(restarted, emulators) == after
    assert 1 not in after.values() and 4 in after.values(), after
    moved = {key for key in KEYS if after[key] != before[key]}
    assert moved <= {key for key in KEYS if before[key] == 1 or after[key] == 4}, (before, after)


def test_bench_replicas_prints_each_strategy_with_every_request_served() -> None:
    """The benchmark end to end, small: both strategies' rows, every request served by a backend
    and none failed, no backend above the two replicas' capacity together (2 x 8). The balance
    figures themselves are the benchmark's business (doc/benchmarks.md)."""
    command = [sys.executable, "-m", "irmiddleware", "bench-replicas", "--requests", "40", "--repeats", "1"]
    options = ["--clients", "5,1", "--strategies", "queue_aware,least_connections"]
    result = subprocess.run([*command, *options], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[2:]}
    assert sorted(rows) == ["least_connections", "queue_aware"], result.stdout
    for line in rows.values():
        numbers = re.findall(r"\d+(?:\.\d+)?", line)
        # imbalance, range low, range high, 4 means, 4 peaks, 4 served, max/mean, req/s, failed
        peaks, served, failed = numbers[7:11], numbers[11:15], numbers[-1]
        assert sum(map(int, served)) == 40 and failed == "0", result.stdout
        assert all(int(peak) <= 16 for peak in peaks), result.stdout
