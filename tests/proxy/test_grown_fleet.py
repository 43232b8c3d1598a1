"""A fleet changed while it runs is watched and exported like the one it started with, on real
uvicorn servers in front of vLLM emulators.

Grown past its startup size with backends that hang (a listening socket that never answers, as a
wedged server does), the health checker still probes every other backend within its interval: a
new healthy backend joins through the admin API and passes check after check while the hung ones'
first probes are still waiting for their timeout (each backend's check is its own task, over a
connection pool that follows the fleet). A backend removed through the admin API leaves no series
labelled with its URL in `/metrics`, while the backends that stay keep theirs.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from admin_support import serve_with_admin
from proxy_support import FAST_FLEET, Emulators

from irmiddleware.proxy import RoutingMiddleware, parse_config
from irmiddleware.proxy._routes import not_found
from irmiddleware.proxy.config import BackendConfig
from irmiddleware.testing import wait_until

TOKEN_ENV = "IRM_TEST_GROWN_TOKEN"
AUTH = {"authorization": "Bearer grown-fleet-token"}
BODY = {"model": "m", "prompt": "Hi", "max_tokens": 2}


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "grown-fleet-token")


def _middleware(urls: list[str], strategy: str = "p2c", **health: Any) -> RoutingMiddleware:
    document = {
        "router": {**FAST_FLEET, "strategy": strategy, "health": {**FAST_FLEET["health"], **health}},
        "backends": [{"url": url, "type": "vllm", "capacity": 8, "models": ["m"]} for url in urls],
        "admin": {"listen": "127.0.0.1:1", "token_env": TOKEN_ENV},
    }
    return RoutingMiddleware(not_found, parse_config(document))


@contextlib.contextmanager
def hung_servers(count: int) -> Iterator[tuple[list[str], Callable[[], None]]]:
    """`count` bound sockets (connections refused) and a function that makes them listen: from
    then on they accept connections (the kernel's backlog) and never answer, as a wedged server."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))

        def hang() -> None:
            for sock in sockets:
                sock.listen(16)

        yield [f"http://127.0.0.1:{sock.getsockname()[1]}" for sock in sockets], hang
    finally:
        for sock in sockets:
            sock.close()


def _checks(metrics: str, url: str, result: str = "") -> float:
    start = f'irm_health_checks_total{{backend="{url}",result="{result}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(start))


@pytest.mark.slow
def test_new_backends_are_probed_on_their_interval_beside_hung_ones(emulators: Emulators) -> None:
    first, fresh = emulators(2)
    # A hung backend's probe waits `timeout_s` (10 s); a healthy backend is checked every 50 ms.
    middleware = _middleware([first.url], timeout_s=10.0)
    with hung_servers(6) as (hung, hang), serve_with_admin(middleware) as served:
        # More backends than the pool sized for one backend had connections (2*1+2), added as
        # SIGHUP and discovery add them (refused at first, they join down).
        entries = [BackendConfig(url=url, type="vllm", capacity=8, models=("m",)) for url in hung]

        async def add_hung() -> None:
            for entry in entries:
                await middleware.add_backend(entry, require_healthy=False)

        served.run(add_hung())
        hang()  # from now on their checks wait for their timeout
        metrics_url = f"{served.admin}/metrics"
        before = httpx.get(metrics_url).text
        added = httpx.post(
            f"{served.admin}/admin/backends",
            json={"url": fresh.url, "type": "vllm", "capacity": 8, "models": ["m"]},
            headers=AUTH,
            timeout=20,
        )
        assert added.status_code == 201, added.text  # its admission probe did not queue either

        def probed_often() -> bool:
            page = httpx.get(metrics_url).text
            return _checks(page, fresh.url, "pass") >= 5 and _checks(page, first.url, "pass") >= 5

        wait_until(probed_often, "the new and the first backend pass 5 checks", timeout_s=8)
        page = httpx.get(metrics_url).text
        assert _checks(page, fresh.url, "fail") == _checks(page, first.url, "fail") == 0
        # Meanwhile the hung backends' checks were waiting (one refused before `hang` may end).
        assert all(_checks(page, url) <= _checks(before, url) + 1 for url in hung)
        answer = httpx.post(f"{served.traffic}/v1/completions", json=BODY, timeout=10)
        assert answer.status_code == 200


@pytest.mark.slow
def test_a_removed_backend_leaves_no_series_in_metrics(emulators: Emulators) -> None:
    staying, leaving = emulators(2)
    middleware = _middleware([staying.url, leaving.url], strategy="round_robin")
    with serve_with_admin(middleware) as served:
        for _ in range(4):
            assert httpx.post(f"{served.traffic}/v1/completions", json=BODY, timeout=10).status_code == 200
        metrics_url = f"{served.admin}/metrics"

        def labelled(url: str) -> list[str]:
            page = httpx.get(metrics_url).text
            return [line for line in page.splitlines() if f'backend="{url}"' in line]

        wait_until(lambda: any("irm_signal_scrapes" in line for line in labelled(leaving.url)), "scraped")
        before = labelled(leaving.url)
        for name in ("irm_requests_total", "irm_upstream_latency_seconds", "irm_health_checks_total"):
            assert any(line.startswith(name) for line in before), name
        backend_id = next(b.id for b in middleware.fleet.backends.values() if b.url == leaving.url)
        admin = f"{served.admin}/admin/backends/{backend_id}"
        assert httpx.post(f"{admin}/drain", headers=AUTH).status_code == 200
        assert httpx.delete(admin, headers=AUTH).status_code == 200
        assert labelled(leaving.url) == []
        kept = labelled(staying.url)
        assert any(line.startswith("irm_requests_total") for line in kept)
        assert any(line.startswith("irm_backend_capacity") for line in kept)
