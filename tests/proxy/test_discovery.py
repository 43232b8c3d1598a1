"""Discovery through DNS (`[[discovery]]`) follows a real DNS server's records: a name's addresses
join the fleet as backends and serve requests, an address removed from the records is drained and
removed with no failed request, a failed or empty resolution keeps the fleet as it is, SIGHUP's
reload of `[[backends]]` leaves discovered backends alone, and a reload applies `[[discovery]]`
itself (a new name resolved at once, a changed capacity in place, a changed `models` by draining and
adding again, a name no longer listed drained and removed and no longer resolved). The DNS server
is dnslib's, on 127.0.0.1; the backends are vLLM emulators on 127.0.0.2, .3 and .4 (one port, as
pods behind a headless Service). Also: every bad `[[discovery]]` value is one ConfigError line, and
doc/kubernetes.md's manifests parse, with a router.toml the router accepts."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from admin_support import LoadLoop, serve_with_admin
from proxy_support import FAST, FAST_FLEET

from irmiddleware.proxy import RoutingMiddleware, create_app, parse_config
from irmiddleware.proxy._reload import Reloader
from irmiddleware.proxy.config import ConfigError
from irmiddleware.proxy.control import resolve
from irmiddleware.testing import assert_idle, create_vllm_app, serve_in_thread, wait_until

dnslib = pytest.importorskip("dnslib")
dns_server = pytest.importorskip("dnslib.server")

NAME = "vllm.default.svc.cluster.local"
ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


class Zone:
    """A resolver for dnslib's server whose A records a test changes; `fail` answers SERVFAIL
    (a failed resolution), `queries` counts the questions about NAME."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.fail = False
        self.queries = 0
        self._lock = threading.Lock()

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        question = request.q
        if str(question.qname).rstrip(".") != NAME:
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
            return reply
        with self._lock:
            self.queries += 1
            if self.fail:
                reply.header.rcode = dnslib.RCODE.SERVFAIL
                return reply
            if question.qtype == dnslib.QTYPE.A:
                for address in self.addresses:
                    reply.add_answer(
                        dnslib.RR(question.qname, dnslib.QTYPE.A, rdata=dnslib.A(address), ttl=1)
                    )
        return reply

    def set(self, *addresses: str, fail: bool = False) -> None:
        with self._lock:
            self.addresses, self.fail = list(addresses), fail


@contextlib.contextmanager
def dns(zone: Zone) -> Iterator[str]:
    """dnslib's UDP server on 127.0.0.1 answering from `zone`; yields its HOST:PORT."""
    server = dns_server.DNSServer(
        zone, address="127.0.0.1", port=0, logger=dns_server.DNSLogger(logf=lambda _: None)
    )
    server.start_thread()
    try:
        yield f"127.0.0.1:{server.server.server_address[1]}"
    finally:
        server.stop()
        server.server.server_close()


def common_free_port() -> int:
    """A TCP port free on every address of ADDRESSES (pods behind one Service share a port)."""
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind((ADDRESSES[0], 0))
            port: int = probe.getsockname()[1]
        try:
            for address in ADDRESSES:
                with socket.socket() as sock:
                    sock.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every test address")


def discovery_config(resolver: str, port: int, **entry: Any) -> dict[str, Any]:
    return {
        "router": {**FAST_FLEET},
        "discovery": [
            {"dns": f"{NAME}:{port}", "resolver": resolver, "interval_s": 0.1, "capacity": 4, **entry}
        ],
    }


def urls(middleware: RoutingMiddleware) -> set[str]:
    return {backend.url for backend in middleware.fleet.backends.values()}


def gone(middleware: RoutingMiddleware, url: str, in_flight_while_draining: list[int]) -> bool:
    """True once the backend at `url` has left the fleet; until then, notes its requests in flight
    while it is draining (read from the test's thread: a removal in between ends the look)."""
    backend = next((b for b in list(middleware.fleet.backends.values()) if b.url == url), None)
    if backend is None:
        return True
    with contextlib.suppress(Exception):
        stats = middleware.router.accelerator_stats(backend.id)
        if stats.state == "draining":
            in_flight_while_draining.append(stats.requests_in_flight)
    return False


@pytest.fixture
def pods() -> Iterator[tuple[int, dict[str, Any]]]:
    """Three vLLM emulators serving "m" on 127.0.0.2-4 and one port; yields the port and the
    emulators by URL. Each answer takes ~50 ms, so a drain has requests in flight to wait for."""
    port = common_free_port()
    with contextlib.ExitStack() as stack:
        emulators = {}
        for address in ADDRESSES:
            app = create_vllm_app(served_model_names=("m",), **{**FAST, "time_per_output_token_s": 0.01})
            stack.enter_context(serve_in_thread(app, host=address, port=port))
            emulators[f"http://{address}:{port}"] = app.state.emulator
        yield port, emulators


@pytest.mark.slow
def test_discovery_follows_the_records_of_a_real_dns_server(pods: tuple[int, dict[str, Any]]) -> None:
    port, emulators = pods
    first, second, third = emulators
    zone = Zone(ADDRESSES[0], ADDRESSES[1])
    with dns(zone) as resolver:
        middleware = create_app(parse_config(discovery_config(resolver, port)))
        with serve_with_admin(middleware) as served:
            # The first answer is applied before the router serves (its models asked of each).
            assert urls(middleware) == {first, second}
            assert middleware.fleet.models == ["m"]
            zone.set(*ADDRESSES)
            wait_until(
                lambda: urls(middleware) == {first, second, third}, "the new record joins", timeout_s=10
            )
            wait_until(lambda: httpx.get(f"{served.traffic}/ready").status_code == 200, "ready", timeout_s=10)

            load = LoadLoop(served.traffic, threads=6, requests=30)
            with load.running():
                wait_until(lambda: load.done >= 20, "traffic flows", timeout_s=30)
                # The second pod, slowed so that its answers outlast a poll, goes away under load.
                emulators[second].reconfigure(time_per_output_token_s=0.1)
                wait_until(
                    lambda: emulators[second].stats.in_progress > 0, "work on the second pod", timeout_s=30
                )
                zone.set(ADDRESSES[0], ADDRESSES[2])
                in_flight_while_draining: list[int] = []
                wait_until(
                    lambda: gone(middleware, second, in_flight_while_draining),
                    "the removed record's backend leaves",
                    timeout_s=20,
                )
            # It was drained, not cut: requests were in flight on it while it drained.
            assert max(in_flight_while_draining, default=0) > 0
            assert load.errors == []
            assert load.statuses == [200] * 180
            for url in (first, second, third):
                stats = emulators[url].stats
                assert stats.received > 0, url  # every pod served
                assert stats.aborted == 0 and stats.failed == 0, url  # the drain cut nothing
            assert emulators[second].stats.in_progress == 0
            served_by_second = emulators[second].stats.received
            assert_idle(middleware.router)

            # A failed resolution (SERVFAIL), then an empty answer: the fleet is kept.
            for failing in ({"fail": True}, {}):
                zone.set(**failing)
                seen = zone.queries
                wait_until(lambda: zone.queries >= seen + 6, "three more resolutions", timeout_s=10)  # noqa: B023
                assert urls(middleware) == {first, third}
            for _ in range(6):
                assert (
                    httpx.post(f"{served.traffic}/v1/completions", json=_BODY, timeout=30).status_code == 200
                )
            assert emulators[second].stats.received == served_by_second
            metrics = httpx.get(f"{served.traffic}/metrics").text
            for result in ("ok", "failed", "empty"):
                assert f'irm_discovery_resolutions_total{{name="{NAME}:{port}",result="{result}"}}' in metrics
            assert f'irm_discovery_backends{{name="{NAME}:{port}"}} 2.0' in metrics

            # The second pod comes back.
            zone.set(*ADDRESSES)
            wait_until(lambda: urls(middleware) == {first, second, third}, "the record is back", timeout_s=10)


_BODY = {"model": "m", "prompt": "Hi", "max_tokens": 3}


@pytest.mark.slow
def test_a_reload_leaves_the_discovered_backends_alone(pods: tuple[int, dict[str, Any]]) -> None:
    port, emulators = pods
    first, second, _ = emulators
    zone = Zone(ADDRESSES[0])
    with dns(zone) as resolver:
        document = discovery_config(resolver, port, models=["m"])
        middleware = create_app(parse_config(document))
        with serve_with_admin(middleware) as served:
            assert urls(middleware) == {first}
            # SIGHUP with a file that lists one static backend: it is added, the discovered one stays.
            changed = parse_config({**document, "backends": [{"url": second, "models": ["m"]}]})
            reloader = Reloader(middleware, lambda: changed)
            served.run(reloader.reload())
            assert urls(middleware) == {first, second}
            # ...and an address that is already a configured backend is not added twice.
            zone.set(ADDRESSES[0], ADDRESSES[1])
            seen = zone.queries
            wait_until(lambda: zone.queries >= seen + 4, "two more resolutions", timeout_s=10)
            assert urls(middleware) == {first, second}
            served.run(reloader.aclose())


@pytest.mark.slow
def test_a_reload_adds_changes_and_removes_discovery_names(pods: tuple[int, dict[str, Any]]) -> None:
    port, emulators = pods
    first, second, static = emulators
    zone = Zone(ADDRESSES[0], ADDRESSES[1])
    with dns(zone) as resolver:
        document: dict[str, Any] = {"router": {**FAST_FLEET}, "backends": [{"url": static, "models": ["m"]}]}
        middleware = create_app(parse_config(document))
        current = {"config": parse_config(document)}
        reloader = Reloader(middleware, lambda: current["config"])

        def reload(**changes: Any) -> None:
            current["config"] = parse_config({**document, **changes})
            served.run(reloader.reload())

        def capacities() -> dict[str, int]:
            return {u: middleware.router.accelerator_stats(b).capacity for u, b in ids(middleware).items()}

        with serve_with_admin(middleware) as served:
            assert urls(middleware) == {static}
            entry = discovery_config(resolver, port, models=["m"])["discovery"][0]
            reload(discovery=[entry])  # a new name: resolved at once
            assert urls(middleware) == {first, second, static}
            assert httpx.post(f"{served.traffic}/v1/completions", json=_BODY, timeout=10).status_code == 200
            reload(discovery=[{**entry, "capacity": 9}])  # changed in place
            assert capacities() == {first: 9, second: 9, static: 64}
            reload(discovery=[{**entry, "capacity": 9, "models": ["m", "other"]}])  # replaced
            wait_until(lambda: {first, second} <= urls(middleware), "the addresses joined again")
            assert {b.url: b.models for b in middleware.fleet.backends.values()}[first] == ("m", "other")
            reload()  # the name is gone: its backends are drained and removed
            wait_until(lambda: urls(middleware) == {static}, "the discovered backends removed")
            seen = zone.queries
            assert httpx.post(f"{served.traffic}/v1/completions", json=_BODY, timeout=10).status_code == 200
            assert zone.queries == seen  # and no longer resolved
            served.run(reloader.aclose())


def ids(middleware: RoutingMiddleware) -> dict[str, int]:
    return {backend.url: backend.id for backend in middleware.fleet.backends.values()}


def test_the_system_resolver_resolves_a_literal_and_localhost() -> None:
    # The default path (getaddrinfo), with no query leaving the host: an address is its own
    # answer, and localhost is in every host's /etc/hosts.
    assert asyncio.run(resolve("127.0.0.2", 8000)) == {"127.0.0.2"}
    assert asyncio.run(resolve("localhost", 8000)) & {"127.0.0.1", "::1"}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({}, "`discovery[0].dns` is required"),
        ({"dns": "vllm.default.svc"}, "`discovery[0].dns` must be HOST:PORT"),
        ({"dns": "vllm:0"}, "`discovery[0].dns` must be HOST:PORT with a port in 1..65535"),
        ({"dns": "vllm:80", "resolver": "10.0.0.10"}, "`discovery[0].resolver` must be HOST:PORT"),
        ({"dns": "vllm:80", "interval_s": 0}, "`discovery[0].interval_s` must be >= 0.05"),
        ({"dns": "vllm:80", "capacity": 0}, "`discovery[0].capacity` must be >= 1"),
        ({"dns": "vllm:80", "models": "m"}, "`discovery[0].models` must be an array"),
        ({"dns": "vllm:80", "port": 80}, "unknown key `discovery[0].port`"),
    ],
)
def test_every_bad_discovery_value_is_one_config_error(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"discovery": [entry]})
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_name_listed_twice_and_no_fleet_at_all_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"`discovery\[1\].dns` 'a:1' is the name of `discovery\[0\]`"):
        parse_config({"discovery": [{"dns": "a:1"}, {"dns": "a:1"}]})
    with pytest.raises(ConfigError, match="unless \\[\\[discovery\\]\\] is given"):
        parse_config({"discovery": []})


def test_discovery_alone_is_a_whole_configuration_with_its_defaults() -> None:
    config = parse_config({"discovery": [{"dns": "vllm.default.svc.cluster.local:8000"}]})
    assert config.backends == ()
    (entry,) = config.discovery
    assert (entry.type, entry.capacity, entry.interval_s, entry.resolver) == ("vllm", 64, 5.0, "")
    assert entry.host_port == ("vllm.default.svc.cluster.local", 8000)


def test_the_kubernetes_example_is_valid_yaml_with_a_valid_router_toml() -> None:
    yaml = pytest.importorskip("yaml")
    text = (Path(__file__).resolve().parents[2] / "doc" / "kubernetes.md").read_text(encoding="utf-8")
    (manifest,) = re.findall(r"```yaml\n(.*?)```", text, re.S)
    documents = list(yaml.safe_load_all(manifest))
    kinds = sorted(document["kind"] for document in documents)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "Secret", "Service", "Service"]
    (config_map,) = (document for document in documents if document["kind"] == "ConfigMap")
    config = parse_config(tomllib.loads(config_map["data"]["router.toml"]))
    assert config.discovery[0].host_port == ("vllm-pods.default.svc.cluster.local", 8000)
    router = next(d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "irm-router")
    (container,) = router["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == config.probes.health_path
    assert container["readinessProbe"]["httpGet"]["path"] == config.probes.ready_path
    assert config.admin.listen.endswith(":9090") and config.listen.endswith(":8000")
