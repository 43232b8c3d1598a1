"""The admin listener and API, on real uvicorn servers in front of vLLM emulators.

With `[admin] listen` set the traffic port serves no metrics, status or admin path (404 as any
unrouted path), and the admin app serves them. Mutating calls need the bearer token: none gives 401
with `WWW-Authenticate: Bearer`, a wrong one 403, no configured token 403 saying how to set one;
refusals are logged without the token; `protect_reads` guards reads too. Bad input gets 400 with one
line, a duplicate URL or a removal before the drain 409, a dead backend 502, an unknown id 404. A
drop-in router with `status_routes=False` leaves its app's own `/metrics` alone. Under a bounded
load loop, adding, re-weighting, draining, removing and undraining backends costs no request
(every answer 200) and leaks no load; the core's pools follow. A reload (what SIGHUP runs) adds,
re-sizes and drains-then-removes, and keeps a backend listed again before its drain is over.
`irmiddleware admin` adds, drains (waiting for the end), undrains and removes, with exit 1 and the
router's message when refused and 2 for bad usage. The `[admin]` keys are checked at load.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from admin_support import LoadLoop, serve_with_admin
from proxy_support import FAST_FLEET, Emulators, held_stream, wait_idle

from irmiddleware.proxy import ConfigError, RoutingMiddleware, parse_config
from irmiddleware.proxy._admin_cli import admin_main
from irmiddleware.proxy._reload import Reloader
from irmiddleware.proxy._routes import not_found
from irmiddleware.testing import assert_idle, serve_in_thread, wait_until

TOKEN = "s3cret-admin-token"
TOKEN_ENV = "IRM_TEST_ADMIN_TOKEN"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _config(urls: list[str], admin: dict[str, Any] | None = None, capacity: int = 8, **router: Any) -> Any:
    backends = [{"url": url, "type": "vllm", "capacity": capacity, "models": ["m"]} for url in urls]
    document = {
        "router": {**FAST_FLEET, **router},
        "backends": backends,
        "admin": {"listen": "127.0.0.1:1", "token_env": TOKEN_ENV} if admin is None else admin,
        "admission": {"max_queue": 64, "max_wait_s": 20.0},
    }
    return parse_config(document)


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)


def test_the_traffic_port_serves_no_metrics_status_or_admin(emulators: Emulators) -> None:
    (backend,) = emulators(1)
    with serve_with_admin(RoutingMiddleware(not_found, _config([backend.url]))) as served:
        for path in ("/metrics", "/irm/status", "/admin/backends"):
            assert httpx.get(served.traffic + path).status_code == 404
        assert httpx.post(f"{served.traffic}/admin/backends/0/drain", headers=AUTH).status_code == 404
        body = {"model": "m", "prompt": "Hi", "max_tokens": 2}
        assert httpx.post(f"{served.traffic}/v1/completions", json=body).status_code == 200
        assert httpx.get(f"{served.admin}/metrics").status_code == 200
        assert httpx.get(f"{served.admin}/irm/status").json()["backends"][0]["url"] == backend.url
        assert httpx.get(f"{served.admin}/nothing").status_code == 404


def test_a_missing_or_wrong_token_is_refused_and_logged_without_it(
    emulators: Emulators, caplog: pytest.LogCaptureFixture
) -> None:
    (backend,) = emulators(1)
    with serve_with_admin(RoutingMiddleware(not_found, _config([backend.url]))) as served:
        drain = f"{served.admin}/admin/backends/0/drain"
        with caplog.at_level(logging.WARNING, logger="irmiddleware.proxy.admin"):
            missing = httpx.post(drain)
            wrong = httpx.post(drain, headers={"authorization": "Bearer not-the-token"})
            not_bearer = httpx.post(drain, headers={"authorization": f"Basic {TOKEN}"})
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert wrong.status_code == 403 and "wrong" in wrong.json()["error"]
        assert not_bearer.status_code == 401
        refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 3 and all(r.levelno == logging.WARNING for r in caplog.records)
        assert not any(TOKEN in message or "not-the-token" in message for message in caplog.messages)
        assert httpx.get(f"{served.admin}/admin/backends").json()["backends"][0]["state"] == "active"
        assert httpx.post(drain, headers=AUTH).json()["state"] == "drained"


def test_without_a_configured_token_every_mutation_is_refused(emulators: Emulators) -> None:
    (backend,) = emulators(1)
    config = _config([backend.url], admin={"listen": "127.0.0.1:1"})
    with serve_with_admin(RoutingMiddleware(not_found, config)) as served:
        answer = httpx.post(f"{served.admin}/admin/backends/0/drain", headers=AUTH)
        assert answer.status_code == 403 and "token_file" in answer.json()["error"]
        assert httpx.get(f"{served.admin}/admin/backends").status_code == 200  # reads stay open


def test_protect_reads_guards_the_lists_status_and_metrics(emulators: Emulators) -> None:
    (backend,) = emulators(1)
    admin = {"listen": "127.0.0.1:1", "token_env": TOKEN_ENV, "protect_reads": True}
    with serve_with_admin(RoutingMiddleware(not_found, _config([backend.url], admin))) as served:
        for path in ("/admin/backends", "/irm/status", "/metrics"):
            assert httpx.get(served.admin + path).status_code == 401
            assert httpx.get(served.admin + path, headers=AUTH).status_code == 200


def test_bad_calls_get_one_clear_line(emulators: Emulators) -> None:
    (backend,) = emulators(1)
    with serve_with_admin(RoutingMiddleware(not_found, _config([backend.url]))) as served:
        api = f"{served.admin}/admin/backends"

        def call(method: str, path: str = "", **body: Any) -> tuple[int, str]:
            answer = httpx.request(method, api + path, json=body or None, headers=AUTH, timeout=10)
            return answer.status_code, answer.json()["error"]

        status, error = call("POST", url="http://user:pw@127.0.0.1:9")
        assert status == 400 and "credentials" in error and "pw" not in error and "\n" not in error
        assert call("POST", url="http://127.0.0.1:0")[0] == 400  # no port
        assert call("POST", url=backend.url.upper().replace("HTTP", "http") + "/")[0] == 409  # same server
        assert call("POST", url="http://127.0.0.1:9", type="nope")[0] == 400
        assert call("POST", url="http://127.0.0.1:9", capacity=0)[0] == 400
        assert call("POST", url="http://127.0.0.1:9", models=["m"], type="tgi")[0] == 400  # m is vllm's
        with serve_in_thread(not_found) as dead:  # answers 404 to its health check
            status, error = call("POST", url=dead.url)
            assert status == 502 and "health" in error
        assert call("DELETE", "/0")[0] == 409  # not drained
        assert call("POST", "/7/drain")[0] == 404
        assert call("GET", "/x")[0] == 404
        assert call("PATCH", "/0", capacity=-1)[0] == 400
        assert call("PATCH", "/0", colour="red")[0] == 400
        assert call("PUT", "/0")[0] == 405
        assert [b["url"] for b in httpx.get(api).json()["backends"]] == [backend.url]  # nothing changed


def test_a_drop_in_router_can_leave_the_apps_metrics_alone(emulators: Emulators) -> None:
    (backend,) = emulators(1)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"the app's metrics"})
        else:
            await not_found(scope, receive, send)

    config = _config([backend.url], admin={})
    middleware = RoutingMiddleware(app, config, status_routes=False)
    try:
        with serve_in_thread(middleware, lifespan=True) as server:
            assert httpx.get(f"{server.url}/metrics").text == "the app's metrics"
            assert httpx.get(f"{server.url}/irm/status").text == "the app's metrics"
    finally:
        middleware.close()


@pytest.mark.slow  # a few seconds of load
@pytest.mark.parametrize("strategy", ["p2c", "consistent_hash"])  # pools, and the ring
def test_fleet_changes_under_load_lose_no_request_and_leak_no_load(
    emulators: Emulators, strategy: str
) -> None:
    first, second, third = emulators(3, time_per_output_token_s=0.005)
    middleware = RoutingMiddleware(not_found, _config([first.url, second.url], strategy=strategy))
    with serve_with_admin(middleware) as served:
        api = f"{served.admin}/admin/backends"
        with LoadLoop(served.traffic).running() as load:
            wait_until(lambda: load.done >= 20, "the load is under way", timeout_s=30)
            added = httpx.post(api, json={"url": third.url, "capacity": 8}, headers=AUTH, timeout=10)
            assert added.status_code == 201, added.text
            new = added.json()
            assert new["state"] == "active" and new["models"] == ["m"]  # discovered before traffic
            wait_until(lambda: third.emulator.stats.completed > 0, "the new backend serves", timeout_s=30)
            patched = httpx.patch(f"{api}/0", json={"capacity": 4, "weight": 2}, headers=AUTH).json()
            assert (patched["capacity"], patched["weight"]) == (4, 2.0)
            assert httpx.post(f"{api}/0/drain", headers=AUTH).json()["state"] in ("draining", "drained")
            wait_until(
                lambda: httpx.get(f"{api}/0").json()["state"] == "drained", "backend 0 drained", timeout_s=30
            )
            assert httpx.delete(f"{api}/0", headers=AUTH).json() == {"removed": 0}
            served_by_first = first.emulator.stats.received
            assert httpx.post(f"{api}/1/drain", headers=AUTH).status_code == 200
            assert httpx.post(f"{api}/1/undrain", headers=AUTH).json()["state"] == "active"
            before_end = load.done
        assert load.errors == [] and load.statuses == [200] * (load.threads * load.requests)
        assert before_end < load.done  # the changes were made while requests were still coming
        wait_idle(middleware)
        backends = httpx.get(api).json()["backends"]
        assert [(b["id"], b["url"]) for b in backends] == [(1, second.url), (new["id"], third.url)]
        assert all(b["load"] == 0 and b["requests_in_flight"] == 0 for b in backends)
        assert middleware.router.pools == {"m": [1, new["id"]]}
        assert_idle(middleware.router)
        assert first.emulator.stats.received == served_by_first  # nothing reached it after removal
        metrics = httpx.get(f"{served.admin}/metrics").text
        for gauge in ("irm_backend_capacity", "irm_backend_healthy", "irm_outlier_ejected"):
            assert f'{gauge}{{backend="{third.url}"}}' in metrics
            assert f'{gauge}{{backend="{first.url}"}}' not in metrics  # gone with the backend


@pytest.mark.parametrize(
    ("admin", "message"),
    [
        ({"listen": "localhost"}, "`admin.listen` must be HOST:PORT"),
        ({"listen": "127.0.0.1:8000"}, "must differ from `router.listen`"),
        ({"token_file": "/t", "token_env": "T"}, "not both"),
        ({"protect_reads": "yes"}, "`admin.protect_reads` must be bool"),
        ({"tokens": "x"}, "unknown key `admin.tokens`"),
    ],
)
def test_admin_keys_are_checked_at_load(admin: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_config({"backends": [{"url": "http://127.0.0.1:9"}], "admin": admin})


def test_a_reload_applies_the_backends_and_keeps_one_listed_again(emulators: Emulators) -> None:
    first, second = emulators(2, time_per_output_token_s=0.01)
    middleware = RoutingMiddleware(not_found, _config([first.url]))
    with serve_with_admin(middleware) as served:
        reloader = Reloader(middleware, lambda: _config([first.url]))

        def fleet() -> dict[str, tuple[int, str]]:
            return {b["url"]: (b["capacity"], b["state"]) for b in middleware.status()["backends"]}

        served.run(reloader.apply(_config([first.url, second.url])))
        assert fleet() == {first.url: (8, "active"), second.url: (8, "active")}
        served.run(reloader.apply(_config([first.url, second.url], capacity=3)))
        assert fleet() == {first.url: (3, "active"), second.url: (3, "active")}
        body = {"model": "m", "prompt": "Hi", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with held_stream(served.traffic, "/v1/completions", body):
            busy = next(b["url"] for b in middleware.status()["backends"] if b["requests_in_flight"])
            idle = second.url if busy == first.url else first.url
            served.run(reloader.apply(_config([idle], capacity=3)))
            assert fleet()[busy] == (3, "draining")  # a request in flight: drained, not yet removed
            served.run(reloader.apply(_config([first.url, second.url], capacity=3)))
            assert fleet()[busy] == (3, "active")  # listed again before the end of its drain: it stays
        wait_idle(middleware)
        assert list(fleet()) == [first.url, second.url]
        served.run(reloader.apply(_config([idle], capacity=3)))
        wait_until(lambda: list(fleet()) == [idle], "the unlisted backend removed once drained")
        served.run(reloader.aclose())


def test_the_admin_command_adds_drains_and_removes(
    emulators: Emulators, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = emulators(2)
    monkeypatch.setenv("IRM_ADMIN_TOKEN", TOKEN)
    with serve_with_admin(RoutingMiddleware(not_found, _config([first.url]))) as served:
        admin = ["--url", served.admin]
        assert admin_main([*admin, "add", second.url, "--capacity", "4"]) == 0
        added = capsys.readouterr().out
        assert second.url in added and "active" in added and " m" in added  # its model discovered
        assert admin_main([*admin, "drain", "1", "--wait", "10"]) == 0
        assert "drained" in capsys.readouterr().out
        assert admin_main([*admin, "undrain", "1"]) == 0
        assert admin_main([*admin, "remove", "1"]) == 1
        assert "409 backend 1 is not drained" in capsys.readouterr().err
        assert admin_main([*admin, "drain", "1"]) == 0 and admin_main([*admin, "remove", "1"]) == 0
        assert admin_main([*admin, "list", "--json"]) == 0
        listed = capsys.readouterr().out
        assert second.url not in listed.split("removed")[-1] and first.url in listed
        monkeypatch.setenv("IRM_ADMIN_TOKEN", "wrong")
        assert admin_main([*admin, "set", "0", "--capacity", "2"]) == 1
        assert "403" in capsys.readouterr().err
        with pytest.raises(SystemExit) as usage:
            admin_main([*admin, "set", "0"])
        assert usage.value.code == 2


def test_a_reload_applies_a_changed_batch_slots(
    emulators: Emulators, monkeypatch: pytest.MonkeyPatch
) -> None:
    (only,) = emulators(1)

    def config(batch_slots: int) -> Any:
        return parse_config(
            {
                "router": {"strategy": "least_ttft"},
                "backends": [{"url": only.url, "models": ["m"], "batch_slots": batch_slots}],
            }
        )

    middleware = RoutingMiddleware(not_found, config(4))
    told: list[tuple[int, int]] = []
    real = middleware.router.set_batch_slots
    # The core keeps no readable copy of a backend's batch slots: the test records what the
    # reload tells it, and the real call still happens.
    monkeypatch.setattr(
        middleware.router,
        "set_batch_slots",
        lambda backend, slots: (told.append((backend, slots)), real(backend, slots))[1],
    )
    with serve_with_admin(middleware) as served:
        reloader = Reloader(middleware, lambda: config(4))
        served.run(reloader.apply(config(16)))
        assert told == [(0, 16)]
        served.run(reloader.aclose())
