"""The plugin API: irmiddleware's pluggy hooks and the small types they exchange.

Plugins are registered through the entry-point group ``irmiddleware``; the built-in adapters and
strategies (``irmiddleware_plugins``) use exactly the same hooks a third party would. A plugin is a
module (or object) with functions marked ``@hookimpl`` whose names match the specs below::

    from irmiddleware.hooks import PythonStrategy, hookimpl

    def pick_emptiest(backends, request):
        fits = [b for b in backends if b.state == "active" and b.load < b.capacity]
        return min(fits, key=lambda b: b.load / b.capacity).id if fits else None

    @hookimpl
    def irm_strategies():
        return [PythonStrategy("emptiest", pick_emptiest)]

See doc/plugins.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

import pluggy
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "PROJECT_NAME",
    "AdapterError",
    "BackendAdapter",
    "BackendInfo",
    "BackendLoad",
    "Endpoint",
    "HealthProbe",
    "IrmHookspecs",
    "LoadSignals",
    "NativeStrategy",
    "PickFunction",
    "PythonStrategy",
    "RequestEvent",
    "RouteInfo",
    "Strategy",
    "hookimpl",
    "hookspec",
    "metric_samples",
]

PROJECT_NAME: Final = "irmiddleware"
"""The pluggy project name and the entry-point group plugins register under."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# ---- types exchanged with strategies ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendLoad:
    """One backend's load at the instant a Python strategy is asked to pick (read-only)."""

    id: int
    url: str
    state: str
    """"active", "draining" or "down"; only active backends accept new requests."""
    capacity: int
    weight: float
    load: int
    """Cost units in flight (what the native core counts against `capacity`)."""
    requests_in_flight: int
    latency_ewma_s: float
    """Exponentially weighted mean request latency; 0.0 until a request has completed."""
    completed: int
    failed: int


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """What the router knows about the request being routed."""

    path: str
    model: str
    cost: int = 1
    priority: int = 0
    session_key: str | None = None
    """A session key (the configured header, else the OpenAI `user` field), for consistent_hash."""
    prompt: str | None = None
    """The prompt as text (chat messages rendered in order), for prefix_affinity."""


PickFunction = Callable[[Sequence[BackendLoad], RouteInfo], "int | None"]
"""`pick(backends, request) -> backend id | None`: `backends` is a snapshot of the pool serving the
request's model; return the id of one of them, or None when none should take the request."""


@dataclass(frozen=True, slots=True)
class NativeStrategy:
    """A strategy implemented in the native core, exposed under `name` (`native` is the core's
    name: "p2c", "round_robin" or "least_connections")."""

    name: str
    native: str


@dataclass(frozen=True, slots=True)
class PythonStrategy:
    """A strategy written in Python. The router calls `pick` with a snapshot of the pool and then
    reserves the chosen backend in the native core (`Router.acquire_on`), so the accounting is the
    same as for native strategies. If `pick` raises or returns an id outside the snapshot, the
    router logs it with the plugin's name and falls back to the native `fallback` strategy."""

    name: str
    pick: PickFunction
    fallback: str = "p2c"


Strategy = NativeStrategy | PythonStrategy


# ---- types exchanged with backend adapters ----------------------------------------------------


class AdapterError(Exception):
    """Raised by an adapter when a request cannot be routed (e.g. malformed JSON: 400). The router
    answers `status` with the adapter's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A path an adapter routes. `kind` "inference" is proxied to a backend serving the request's
    model; "models" is answered by the router from the models it knows (the union over backends);
    "health" is answered by the router from its fleet view (`BackendAdapter.health_answer`)."""

    path: str
    methods: frozenset[str]
    kind: Literal["inference", "models", "health"] = "inference"


@dataclass(frozen=True, slots=True)
class LoadSignals:
    """Load a backend reports about itself (its Prometheus endpoint), whoever sent it."""

    queue_depth: int
    """Requests waiting in the server's queue."""
    kv_usage: float = 0.0
    """KV-cache use, 0-1 (0 when the server does not report it)."""
    running: int | None = None
    """Requests executing (informational: status and metrics)."""


def metric_samples(metrics_text: str, names: Collection[str]) -> dict[str, list[float]]:
    """The values of the samples named `names` in a Prometheus text exposition (one per label
    set), parsed with prometheus-client's parser. Names are as the page writes them (a counter
    written without `_total`, as TGI does, is found under that name). Raises ValueError when a
    line of those samples cannot be parsed; the other lines are not read at all.

    Only the lines of those metrics reach the parser (`_wanted_lines`): a server's page is mostly
    histograms the router never reads, and parsing them all costs far more than the few lines it
    needs (figures in doc/benchmarks.md, `irmiddleware bench-signals`)."""
    found: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(_wanted_lines(metrics_text, names)):
        for sample in family.samples:
            if sample.name in names:
                found.setdefault(sample.name, []).append(sample.value)
    return found


def _wanted_lines(metrics_text: str, names: Collection[str]) -> str:
    """The sample lines of `names` in a Prometheus text exposition, in page order. Each name is
    found with `str.find`, a scan in C: a Python loop over a 600-line page costs more than the
    parse it saves. The `# HELP`/`# TYPE` lines are left out: without them the parser reads each
    sample as untyped, with the same name and value (the tests compare against whole-page parses)."""
    text = "\n" + metrics_text
    found: list[tuple[int, str]] = []
    for name in names:
        needle = "\n" + name
        start = text.find(needle)
        while start >= 0:  # Bounded: each match moves `start` forward.
            end = text.find("\n", start + 1)
            line = text[start + 1 : end if end >= 0 else len(text)]
            # The name must end here (at labels, a space or a tab), not continue as another's.
            if line[len(name) : len(name) + 1] in ("{", " ", "\t"):
                found.append((start, line))
            start = text.find(needle, start + 1)
    found.sort()
    return "".join(line + "\n" for _start, line in found)


class BackendAdapter:
    """How the router speaks one backend protocol: which paths it routes, where a request names its
    model, what errors look like, how to check health, discover models and read load signals.

    This is the protocol-neutral contract. A subclass must set `type_name` and `endpoints` and
    implement `model_of` (and `parse_models` when it sets `models_path`); every other member has
    a neutral default to override where the protocol differs. For an OpenAI-compatible server,
    subclass `irmiddleware.adapters.OpenAIAdapter` instead, which implements all of it for the
    OpenAI API (vLLM's and TGI's adapters do). Instances are shared by every request: keep them
    stateless.
    """

    type_name: str = ""
    """The backend type this adapter is registered as (`[[backends]] type`)."""
    health_path: str = "/health"
    """GET this path; any 2xx means healthy (used by health checks)."""
    models_path: str | None = None
    """GET this path to discover the served models when the config lists none; None = cannot."""
    models_method: str = "GET"
    """The method of the discovery request (Triton's repository index is a POST)."""
    overload_statuses: frozenset[int] = frozenset({429, 503})
    """Statuses meaning "too busy, try another backend": retried elsewhere when no byte has
    reached the client yet, and counted against the backend by outlier detection."""
    overload_in_stream: bool = False
    """True when the server can report overload inside a 200 event stream instead of with a
    status (TGI takes its permit inside the stream, doc/protocols.md §3.4). The router then holds a
    `text/event-stream` answer's headers until its first event has arrived, asks
    `stream_overloaded`, and retries elsewhere as for an overload status. Off by default: holding
    the headers delays them until the first token (the first token itself is not delayed)."""
    single_model: bool = False
    """True when requests need not name the model (TGI serves one per server): a request whose
    `model_of` is "" then goes to the one model the backends of this type serve."""
    endpoints: tuple[Endpoint, ...] = ()
    """The paths this adapter routes (exact paths; templates with `{...}` need `match`)."""

    def match(self, method: str, path: str) -> Endpoint | None:
        """The endpoint for a request, or None if this adapter does not route it. The default
        matches `endpoints` by exact path; the middleware indexes those, so this is only called
        for adapters that override it (path parameters)."""
        for endpoint in self.endpoints:
            if endpoint.path == path and method in endpoint.methods:
                return endpoint
        return None

    def model_of(self, endpoint: Endpoint, path: str, body: bytes) -> str:
        """The model a request names (from its path or body). Raise `AdapterError(400)` for a
        request the router cannot read; return "" when a `single_model` request names none."""
        raise NotImplementedError(f"{type(self).__name__} must say where a request names its model")

    def affinity_of(self, endpoint: Endpoint, body: bytes) -> tuple[str | None, str | None]:
        """(session key, prompt text) of a request, for the cache-aware strategies; None where
        the request has none. Default: neither."""
        return None, None

    def stream_overloaded(self, first_event: bytes) -> bool:
        """Whether the first event of a 200 event stream is the server's overload report (only
        asked when `overload_in_stream` is True). `first_event` holds at least the first event,
        or all the stream had when it ended or passed 64 KiB."""
        return False

    def error_body(self, status: int, message: str, param: str | None = None) -> bytes:
        """The body of an error the router answers itself, in the API's shape. Default:
        `{"error": message}`."""
        return json.dumps({"error": message}).encode()

    def models_body(self, models: Sequence[str], created: int) -> bytes:
        """The router's own answer to a "models" endpoint: every model some backend serves.
        Default: a JSON array of the names."""
        return json.dumps(list(models)).encode()

    def health_answer(self, ready: bool) -> tuple[int, bytes]:
        """The router's own answer to a "health" endpoint: `ready` is True when some backend
        takes requests. Default: 200 empty, else 503 with `error_body`."""
        return (200, b"") if ready else (503, self.error_body(503, "No backend is ready."))

    def metrics_url(self, base_url: str) -> str | None:
        """Where the backend publishes Prometheus metrics (for load signals); None = nowhere.
        A backend's `metrics_url` in the configuration overrides it."""
        return None

    def load_signals(self, metrics_text: str) -> LoadSignals | None:
        """The load the backend reports in its metrics text; None when the text has none."""
        return None

    def parse_models(self, body: bytes) -> list[str]:
        """The model names in a backend's answer to `models_path` (discovery); only called when
        `models_path` is set."""
        raise NotImplementedError(f"{type(self).__name__} sets models_path but cannot read the answer")


# ---- types exchanged with health checks and observers -----------------------------------------


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """A configured backend: its id in the router, base URL, adapter type and models."""

    id: int
    url: str
    type: str
    models: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HealthProbe:
    """How to check one backend: GET `path`; healthy when the status is in `ok_statuses`."""

    path: str
    ok_statuses: frozenset[int] = field(default_factory=lambda: frozenset(range(200, 300)))
    timeout_s: float = 2.0


@dataclass(frozen=True, slots=True)
class RequestEvent:
    """One step of a proxied request, for observers (`irm_request_*`)."""

    request_id: int
    path: str
    model: str
    backend_id: int
    backend_url: str
    strategy: str
    attempt: int
    """1 for the first backend tried, 2 for the first retry, ..."""
    status: int | None = None
    """The backend's HTTP status, once known."""
    elapsed_s: float = 0.0
    """Seconds since the router started handling the request."""
    error: str | None = None
    """Why the request failed (`irm_request_failed` only)."""


# ---- hook specifications ----------------------------------------------------------------------


class IrmHookspecs:
    """The hooks irmiddleware calls. Implement any subset in a plugin with `@hookimpl`."""

    # ---- registration: strategies and adapters (called once, when a router is built) ----------

    @hookspec
    def irm_strategies(self) -> Sequence[Strategy]:  # type: ignore[empty-body]
        """Strategies this plugin provides, selectable by name in `[router] strategy`.

        Return `NativeStrategy` entries to expose a core strategy under a name, `PythonStrategy`
        entries for strategies written in Python. Two plugins offering one name is a
        configuration error naming both plugins.
        """

    @hookspec
    def irm_adapters(self) -> Mapping[str, Callable[[], BackendAdapter]]:  # type: ignore[empty-body]
        """Backend adapters this plugin provides: type name (the `type` of a `[[backends]]`
        entry: "vllm", "openai", later "triton", "tgi") -> a factory returning the adapter.
        Two plugins offering one type name is a configuration error naming both plugins.
        """

    # ---- health checks -----------------------------------------------------------------------

    @hookspec(firstresult=True)
    def irm_health_probe(self, backend: BackendInfo, adapter: BackendAdapter) -> HealthProbe | None:
        """How to check `backend`'s health. The first plugin returning a probe wins; None lets
        the next plugin decide, and when all return None the adapter's `health_path` is used.
        """

    @hookspec
    def irm_backend_state_changed(self, backend: BackendInfo, old: str, new: str, reason: str) -> None:
        """Notification: `backend` went from state `old` to `new` ("active", "draining",
        "down") because of `reason` (a short human-readable text). Return value ignored.
        """

    # ---- request lifecycle notifications (observers; must be fast and must not raise) --------

    @hookspec
    def irm_request_routed(self, event: RequestEvent) -> None:
        """A request was reserved on `event.backend_id` and is about to be sent (once per
        attempt: a retry after a connection failure is routed again with `attempt` + 1)."""

    @hookspec
    def irm_request_first_byte(self, event: RequestEvent) -> None:
        """The backend's response status and headers arrived (`event.status`); from now on the
        request is never retried."""

    @hookspec
    def irm_request_completed(self, event: RequestEvent) -> None:
        """The whole response was relayed to the client (`event.status` may be an error status
        the backend chose); its load has been released."""

    @hookspec
    def irm_request_failed(self, event: RequestEvent) -> None:
        """The attempt ended without a complete response (`event.error`: "connect_error",
        "timeout", "upstream_error", "overloaded" (answered an overload status and was retried
        elsewhere), "client_disconnected", "cancelled", "internal"); its load has been
        released."""
