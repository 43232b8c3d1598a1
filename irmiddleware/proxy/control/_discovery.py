"""Discovery through DNS (`[[discovery]]`): every address a name resolves to is a backend.

Each entry's name is resolved every `interval_s`, as a Kubernetes headless Service, Consul or
Envoy's STRICT_DNS expose a set of servers: one A/AAAA record per server. An address not yet in
the fleet joins as `http://ADDRESS:PORT` (probed and asked its models first; one that does not
answer yet joins down, and its health checks bring it in); an address that left the answer is
drained, and removed once nothing is in flight on it; one that comes back before its drain is over
is undrained. A resolution that fails, times out or yields no address changes nothing (it is
logged once per failing streak): a DNS outage must not empty a fleet that still serves, and
servers that are really gone are taken out by their health checks.

Resolution uses the event loop's `getaddrinfo` (the system's resolver, as every program on the
host), or, with `resolver = "HOST:PORT"`, asks that nameserver directly over UDP for A and AAAA
records (with `dnslib`, the `discovery` extra).

The fleet is changed only through `FleetChanges` (the middleware's `add_backend`, `drain`,
`undrain` and `remove_backend`), in steps of the event loop; `Removals` is the drain-then-remove
that SIGHUP's reload uses too.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import logging
import random
import socket
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from irmiddleware.proxy._fleet import Fleet, FleetChangeRefused
from irmiddleware.proxy.config import BackendConfig, ConfigError, DiscoveryConfig, parse_backend

__all__ = ["Discovery", "FleetChanges", "Removals", "check_resolvers", "resolve"]

log = logging.getLogger("irmiddleware.proxy.discovery")

_DRAIN_POLL_S: Final = 0.05
_DNS_PAYLOAD_MAX: Final = 4096


class FleetChanges(Protocol):
    """What changes the fleet (`RoutingMiddleware`): the calls the admin API makes."""

    @property
    def fleet(self) -> Fleet: ...

    async def add_backend(self, entry: BackendConfig, *, require_healthy: bool = True) -> int: ...

    def drain(self, backend_id: int) -> None: ...

    def undrain(self, backend_id: int) -> None: ...

    def remove_backend(self, backend_id: int) -> None: ...

    def update_backend(
        self, backend_id: int, *, capacity: int | None = None, weight: float | None = None
    ) -> None: ...


class Removals:
    """Backends being drained to be removed: each is removed once nothing is in flight on it, or
    kept when something undrains it first (`cancel`, or an operator's undrain)."""

    def __init__(self, changes: FleetChanges) -> None:
        self._changes = changes
        self._tasks: dict[int, asyncio.Task[None]] = {}

    def __contains__(self, backend_id: int) -> bool:
        return backend_id in self._tasks

    @property
    def ids(self) -> frozenset[int]:
        """The backends being drained to be removed."""
        return frozenset(self._tasks)

    def start(self, backend_id: int) -> None:
        """Drains `backend_id` and removes it once drained (no-op when already under way)."""
        if backend_id in self._tasks:
            return
        self._changes.drain(backend_id)
        self._tasks[backend_id] = asyncio.create_task(self._remove_when_drained(backend_id))

    def cancel(self, backend_id: int) -> bool:
        """Keeps a backend whose removal is under way (undrained); False when none was."""
        task = self._tasks.pop(backend_id, None)
        if task is None:
            return False
        task.cancel()
        self._changes.undrain(backend_id)
        return True

    async def _remove_when_drained(self, backend_id: int) -> None:
        fleet = self._changes.fleet
        try:
            while (backend := fleet.backends.get(backend_id)) is not None:
                stats = fleet.router.accelerator_stats(backend_id)
                if stats.state != "draining":
                    log.warning("backend %s was undrained before its removal: it stays", backend.url)
                    return
                if not stats.load and not stats.requests_in_flight:
                    self._changes.remove_backend(backend_id)
                    return
                await asyncio.sleep(_DRAIN_POLL_S)
        finally:
            if self._tasks.get(backend_id) is asyncio.current_task():
                del self._tasks[backend_id]

    async def aclose(self) -> None:
        """Cancels the removals under way (at shutdown): their backends stay drained."""
        tasks, self._tasks = list(self._tasks.values()), {}
        await _cancel(tasks)


async def resolve(host: str, port: int, *, resolver: str = "", timeout_s: float = 2.0) -> frozenset[str]:
    """The IPv4 and IPv6 addresses of `host`, bounded by `timeout_s`: from `getaddrinfo`, or asked
    of the nameserver `resolver` (HOST:PORT). OSError (or TimeoutError) when the name does not
    resolve; an empty set when it resolves to no address."""
    async with asyncio.timeout(timeout_s):
        if resolver:
            answers = await asyncio.gather(*(_query(host, kind, resolver) for kind in ("A", "AAAA")))
            return frozenset().union(*answers)
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        return frozenset(str(info[4][0]) for info in infos)


async def _query(host: str, kind: str, resolver: str) -> frozenset[str]:
    """One UDP query of `resolver` for `host`'s records of type `kind` (A or AAAA)."""
    try:
        import dnslib  # type: ignore[import-untyped]
    except ImportError:
        raise OSError("`resolver` needs dnslib: pip install 'irmiddleware[discovery]'") from None
    server, _, port = resolver.rpartition(":")
    question = dnslib.DNSRecord.question(host, kind)
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not answer.done():
                answer.set_result(data)

        def error_received(self, exc: Exception) -> None:
            if not answer.done():
                answer.set_exception(exc)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=(server.strip("[]"), int(port)))
    try:
        transport.sendto(question.pack())
        reply = dnslib.DNSRecord.parse(await answer)
    except dnslib.DNSError as error:
        raise OSError(f"bad answer from {resolver}: {error}") from None
    finally:
        transport.close()
    if reply.header.id != question.header.id:
        raise OSError(f"answer from {resolver} does not match the query")
    rcode = dnslib.RCODE.get(reply.header.rcode)
    if rcode not in ("NOERROR", "NXDOMAIN"):
        raise OSError(f"{resolver} answered {rcode} for {host} {kind}")
    wanted = getattr(dnslib.QTYPE, kind)
    return frozenset(str(rr.rdata) for rr in reply.rr if rr.rtype == wanted)


def check_resolvers(entries: tuple[DiscoveryConfig, ...]) -> None:
    """ConfigError when an entry names a `resolver` and `dnslib`, which asks it, is missing."""
    if any(entry.resolver for entry in entries) and importlib.util.find_spec("dnslib") is None:
        raise ConfigError("`discovery.resolver` needs dnslib: pip install 'irmiddleware[discovery]'")


class _Name:
    """One `[[discovery]]` entry: its name's last good answer and the backends it added."""

    def __init__(self, config: DiscoveryConfig) -> None:
        self.config = config
        self.backends: dict[str, int] = {}
        """Backend id of each address this entry added, by URL."""
        self.failing = False
        self.refused: set[str] = set()
        """URLs the fleet refused (already configured, say): logged once, tried again each time."""

    def url_of(self, address: str) -> str:
        host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
        return f"http://{host}:{self.config.host_port[1]}"

    def entry_for(self, url: str) -> BackendConfig:
        config = self.config
        return parse_backend(
            {
                "url": url,
                "type": config.type,
                "capacity": config.capacity,
                "models": list(config.models),
                "weight": config.weight,
            },
            f"discovery {config.dns}",
        )


class Discovery:
    """Resolves every `[[discovery]]` name on its interval and applies the difference to the
    fleet, from `start` (which applies the first answers before it returns) to `aclose`."""

    def __init__(
        self, entries: tuple[DiscoveryConfig, ...], changes: FleetChanges, registry: CollectorRegistry
    ) -> None:
        self._names = [_Name(entry) for entry in entries]
        self._changes = changes
        self._resolutions = Counter(
            "irm_discovery_resolutions",
            "Resolutions of a [[discovery]] name, by result (ok, failed, empty).",
            ["name", "result"],
            registry=registry,
        )
        self._backends = Gauge(
            "irm_discovery_backends",
            "Backends a [[discovery]] name added that are in the fleet (draining ones included).",
            ["name"],
            registry=registry,
        )
        self.removals = Removals(changes)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        """The watcher of each name, by its `dns`."""
        self._started = False

    @property
    def backend_ids(self) -> frozenset[int]:
        """The backends discovery added (and owns: a reload of `[[backends]]` leaves them alone),
        those it is draining to remove included."""
        return frozenset(i for name in self._names for i in name.backends.values()) | self.removals.ids

    async def start(self) -> None:
        """Resolves every name once and applies the answers, then re-resolves on each interval
        in the background. Idempotent."""
        if self._started:
            return
        self._started = True
        await self._watch_all(self._names)

    async def _watch_all(self, names: list[_Name]) -> None:
        for name in names:
            config = name.config
            how = f"nameserver {config.resolver}" if config.resolver else "the system resolver"
            log.info("discovery: resolving %s every %g s with %s", config.dns, config.interval_s, how)
        await asyncio.gather(*(self.refresh(name) for name in names))
        for name in names:
            self._tasks[name.config.dns] = asyncio.create_task(
                self._watch(name), name=f"irm-discovery-{name.config.dns}"
            )

    async def reconfigure(self, entries: tuple[DiscoveryConfig, ...]) -> None:
        """Applies re-read `[[discovery]]` entries (SIGHUP), by name: a name no longer listed
        stops being resolved and its backends are drained and removed; a new name is resolved at
        once; a name whose `type` or `models` changed is both (its addresses join again, with the
        new settings, once their drain is over); any other change (capacity, weight, interval,
        timeout, resolver) applies in place."""
        old = {name.config.dns: name for name in self._names}
        new = {entry.dns: entry for entry in entries}
        kept: list[_Name] = []
        added: list[_Name] = []
        for dns, name in old.items():
            entry = new.get(dns)
            if entry is None or (entry.type, entry.models) != (name.config.type, name.config.models):
                await self._stop(name)
                if entry is not None:
                    added.append(_Name(entry))
                continue
            if entry != name.config:
                await self._stop(name, drain=False)
                self._update(name, entry)
                added.append(name)
            kept.append(name)
        added += [_Name(entry) for dns, entry in new.items() if dns not in old]
        self._names = [*kept, *(name for name in added if name not in kept)]
        if self._started and added:
            await self._watch_all(added)

    async def _stop(self, name: _Name, *, drain: bool = True) -> None:
        """Stops resolving `name`; with `drain`, its backends are drained and removed."""
        task = self._tasks.pop(name.config.dns, None)
        if task is not None:
            await _cancel([task])
        if not drain:
            return
        log.info("discovery of %s ends: draining its %d backends", name.config.dns, len(name.backends))
        for backend_id in name.backends.values():
            if backend_id in self._changes.fleet.backends:
                self.removals.start(backend_id)
        self._backends.labels(name.config.dns).set(0)
        name.backends.clear()

    def _update(self, name: _Name, entry: DiscoveryConfig) -> None:
        """Gives `name` a changed entry of the same type and models; its backends take the new
        capacity and weight."""
        old, name.config = name.config, entry
        if (old.capacity, old.weight) == (entry.capacity, entry.weight):
            return
        for backend_id in name.backends.values():
            if backend_id in self._changes.fleet.backends:
                self._changes.update_backend(backend_id, capacity=entry.capacity, weight=entry.weight)
        log.info("discovery of %s: capacity %d, weight %g", entry.dns, entry.capacity, entry.weight)

    async def aclose(self) -> None:
        """Stops resolving (lifespan shutdown); removals under way are cancelled."""
        tasks, self._tasks = list(self._tasks.values()), {}
        self._started = False
        await _cancel(tasks)
        await self.removals.aclose()

    async def _watch(self, name: _Name) -> None:
        while True:
            # A little jitter, so that routers started together do not query in step.
            await asyncio.sleep(name.config.interval_s * random.uniform(0.9, 1.1))
            try:
                await self.refresh(name)
            except Exception:  # keep watching whatever one round hit
                log.exception("discovery of %s failed", name.config.dns)

    async def refresh(self, name: _Name) -> None:
        """Resolves `name` once and applies the answer (a failed or empty one changes nothing)."""
        config = name.config
        host, port = config.host_port
        try:
            addresses = await resolve(host, port, resolver=config.resolver, timeout_s=config.timeout_s)
            if not addresses:
                raise LookupError("the answer has no address")
        except (OSError, TimeoutError, LookupError) as error:
            self._resolutions.labels(
                config.dns, "empty" if isinstance(error, LookupError) else "failed"
            ).inc()
            if not name.failing:  # log a failing streak once, not every interval
                name.failing = True
                log.warning("cannot resolve %s (the fleet is kept): %r", config.dns, error)
            return
        self._resolutions.labels(config.dns, "ok").inc()
        if name.failing:
            name.failing = False
            log.info("%s resolves again", config.dns)
        await self._apply(name, {name.url_of(address) for address in addresses})
        self._backends.labels(config.dns).set(len(name.backends))

    async def _apply(self, name: _Name, urls: set[str]) -> None:
        for url, backend_id in list(name.backends.items()):
            if backend_id not in self._changes.fleet.backends:
                del name.backends[url]  # removed (by its drain, or by an operator)
            elif url not in urls:
                if backend_id not in self.removals:
                    log.info("%s no longer lists %s: draining it", name.config.dns, url)
                    self.removals.start(backend_id)
            elif self.removals.cancel(backend_id):
                log.info("%s lists %s again: it stays", name.config.dns, url)
        new = sorted(urls - name.backends.keys())
        await asyncio.gather(*(self._add(name, url) for url in new))

    async def _add(self, name: _Name, url: str) -> None:
        leaving = self.removals.ids
        if any(b.url == url and b.id in leaving for b in self._changes.fleet.backends.values()):
            return  # an entry replaced on reload: the address joins again once its drain is over
        try:
            backend_id = await self._changes.add_backend(name.entry_for(url), require_healthy=False)
        except (FleetChangeRefused, ValueError) as error:
            if url not in name.refused:
                name.refused.add(url)
                log.error("discovery of %s: backend %s not added: %s", name.config.dns, url, error)
            return
        name.refused.discard(url)
        name.backends[url] = backend_id


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
