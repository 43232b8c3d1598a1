"""`irmiddleware serve` bounds what a client can hold or make it buffer, at the socket: a head
over `max_head_bytes` (one 64 MB header) gets 431 while the router's peak memory stays flat, more
than `max_headers` fields get 431, half-sent heads (sent at once or dripped) and a body that stops
get 408 and a closed connection after their deadlines, while an answer that lasts longer than
those deadlines is never cut; a connection beyond `max_client_connections` gets a readable 503
while the ones inside the bound are served, and `serve` raises its open-files limit so the bound
is reachable; an idle connection is closed after `client_idle_s` (one that never sent a byte
too), and by default an idle keep-alive connection is still open, and reused, after uvicorn's old
5 s. Heads cut into single bytes and pipelined requests read as before. Every refusal is counted
once in `irm_edge_refusals_total{reason}`. Bad values are one clear `ConfigError`. Each runs a
real `irmiddleware serve` process in front of an emulated vLLM and talks to it over raw sockets
(httpx for the stream), so the bytes on the wire are the test's; every wait is bounded and nothing
asserts on wall-clock time."""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from irmiddleware.proxy import ConfigError, parse_config
from irmiddleware.testing import RunningServer, create_vllm_app, serve_in_thread, wait_until

pytestmark = pytest.mark.slow  # real `irmiddleware serve` processes

_GET = b"GET /v1/models HTTP/1.1\r\nHost: router\r\n\r\n"
_MB = 1024 * 1024


class Serve:
    """An `irmiddleware serve` process with `[router.limits]` and `[router.timeouts]` from a test."""

    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.port = port

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=20)

    def open_files_limit(self) -> int:
        """The process's soft open-files limit, as the kernel reports it."""
        for line in Path(f"/proc/{self.process.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
        raise AssertionError("no open-files line in /proc limits")

    def peak_memory_kb(self) -> int:
        """The process's resident-set high-water mark (VmHWM), a count the kernel keeps."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc status")


@contextlib.contextmanager
def _serve(
    tmp_path: Path,
    backend: RunningServer,
    limits: str = "",
    timeouts: str = "",
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[Serve]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / f"router-{port}.toml"
    config.write_text(
        f'[router]\nlisten = "127.0.0.1:{port}"\n[router.limits]\n{limits}\n[router.timeouts]\n{timeouts}\n'
        f'[[backends]]\nurl = "{backend.url}"\nmodels = ["m"]\n'
    )
    command = [
        sys.executable,
        "-m",
        "irmiddleware",
        "serve",
        "--config",
        str(config),
        "--log-level",
        "warning",
    ]
    server = Serve(subprocess.Popen(command, preexec_fn=preexec_fn), port)
    try:
        wait_until(lambda: _answers(server), "the router answers", timeout_s=30)
        yield server
    finally:
        server.process.kill()
        server.process.wait(10)


def _answers(server: Serve) -> bool:
    assert server.process.poll() is None, "irmiddleware serve exited"
    with contextlib.suppress(OSError), server.connect() as sock:
        sock.sendall(_GET)
        return _read_answer(sock).startswith(b"HTTP/1.1 200")
    return False


def _read_answer(sock: socket.socket) -> bytes:
    """One whole response with a content-length (the router's own answers have one)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _read_to_end(sock: socket.socket) -> bytes:
    """Everything the router sends until it closes the connection (a reset counts as closed)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.fixture(scope="module")
def backend() -> Iterator[RunningServer]:
    with serve_in_thread(create_vllm_app(served_model_names=("m",))) as server:
        yield server


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, backend: RunningServer) -> Iterator[Serve]:
    """The default limits (64 KiB heads, 75 s idle) but 20 header fields and 1 s head and body
    deadlines, so the tests wait for seconds, not minutes."""
    with _serve(
        tmp_path_factory.mktemp("edge"),
        backend,
        "max_headers = 20",
        "client_head_s = 1.0\nclient_body_s = 1.0",
    ) as server:
        yield server


# ---- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("limits", "max_head_bytes", 100),
        ("limits", "max_headers", 0),
        ("limits", "max_client_connections", 0),
        ("timeouts", "client_head_s", 0),
        ("timeouts", "client_body_s", -1.0),
        ("timeouts", "client_idle_s", "75"),
    ],
)
def test_a_bad_client_bound_is_one_clear_config_error(section: str, key: str, value: object) -> None:
    document = {"router": {section: {key: value}}, "backends": [{"url": "http://127.0.0.1:9"}]}
    with pytest.raises(ConfigError, match=f"router.{section}.{key}"):
        parse_config(document)


def test_the_default_idle_timeout_outlives_load_balancers_and_client_pools() -> None:
    config = parse_config({"backends": [{"url": "http://127.0.0.1:9"}]})
    assert config.timeouts.client_idle_s >= 75  # nginx's keepalive_timeout; uvicorn's default is 5 s
    assert config.timeouts.client_head_s <= 60 and config.timeouts.client_body_s <= 120
    assert config.limits.max_head_bytes <= _MB and config.limits.max_headers <= 1000


# ---- heads -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_64_mb_header_gets_431_and_the_router_never_buffers_it(edge: Serve) -> None:
    before_kb = edge.peak_memory_kb()
    sent = 0
    with edge.connect() as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: router\r\nX-Big: ")
        chunk = b"a" * _MB
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(64):
                sock.sendall(chunk)
                sent += len(chunk)
            sock.sendall(b"\r\n\r\n")
        answer = _read_to_end(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"larger than 65536 bytes" in answer
    grown_mb = (edge.peak_memory_kb() - before_kb) / 1024
    # Without the bound the router buffered the whole header, several times over (over 100 MB).
    assert grown_mb < 16, f"the router's peak memory grew by {grown_mb:.0f} MB"
    assert _answers(edge)


@pytest.mark.slow
def test_more_header_fields_than_the_bound_get_431(edge: Serve) -> None:
    def get(fields: int) -> bytes:
        headers = b"".join(b"X-F%d: v\r\n" % index for index in range(fields - 1))
        with edge.connect() as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: router\r\n" + headers + b"\r\n")
            return _read_answer(sock)

    assert get(20).startswith(b"HTTP/1.1 200 ")
    refused = get(21)
    assert refused.startswith(b"HTTP/1.1 431 ") and b"more than 20 header fields" in refused


# ---- deadlines ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_half_sent_heads_are_answered_408_and_closed_after_the_head_deadline(edge: Serve) -> None:
    # Half the connections stop after a part of their head; the other half drip a byte every
    # 0.2 s, which an inactivity timer would never cut. The deadline is 1 s; the test waits 20.
    stalled = [edge.connect() for _ in range(40)]
    dripping = [edge.connect() for _ in range(40)]
    part = b"POST /v1/completions HTTP/1.1\r\nHost: router\r\n"
    for sock in stalled + dripping:
        sock.sendall(part)
        sock.setblocking(False)
    answers = {sock: b"" for sock in stalled + dripping}
    open_ = set(answers)
    with selectors.DefaultSelector() as selector:
        for sock in answers:
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + 20
        while open_ and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                answers[sock] += chunk
                if not chunk:
                    open_.discard(sock)
                    selector.unregister(sock)
            for sock in open_.intersection(dripping):
                with contextlib.suppress(OSError):  # the router may be closing it right now
                    sock.send(b"x")
    for sock in answers:
        sock.close()
    assert not open_, f"{len(open_)} of {len(answers)} half-sent heads still open after 20 s"
    for answer in answers.values():
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"The request head did not arrive within 1 s." in answer
    assert _answers(edge)


@pytest.mark.slow
def test_a_body_that_stops_gets_408_and_a_closed_connection(edge: Serve) -> None:
    with edge.connect() as sock:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
        sock.sendall(head + b"Content-Length: 100\r\n\r\n" + b'{"model": "m", ')
        answer = _read_to_end(sock)  # bounded by the socket's 20 s timeout; the deadline is 1 s
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"The request body did not arrive within 1 s." in answer
    assert _answers(edge)


@pytest.mark.slow
def test_an_answer_longer_than_the_deadlines_is_never_cut(edge: Serve) -> None:
    # ~2.5 s of tokens (the emulator's 5 ms each) against 1 s head and body deadlines: the
    # deadlines cover reading the request, never the answer.
    body = {"model": "m", "prompt": "Hi", "max_tokens": 500, "ignore_eos": True, "stream": True}
    url = f"http://127.0.0.1:{edge.port}/v1/completions"
    with httpx.Client(timeout=30) as client:
        for _ in range(2):  # twice on one keep-alive connection
            with client.stream("POST", url, json=body) as response:
                lines = [line for line in response.iter_lines() if line]
            assert response.status_code == 200
            assert len(lines) == 501 and lines[-1] == "data: [DONE]"


@pytest.mark.slow
def test_by_default_an_idle_keepalive_connection_outlives_uvicorns_old_5_s(edge: Serve) -> None:
    with edge.connect() as sock:
        sock.sendall(_GET)
        assert _read_answer(sock).startswith(b"HTTP/1.1 200 ")
        time.sleep(6)  # longer than uvicorn's default keep-alive (5 s), shorter than 75 s
        sock.sendall(_GET)
        assert _read_answer(sock).startswith(b"HTTP/1.1 200 ")  # the same connection, reused


@pytest.mark.slow
def test_idle_connections_are_closed_after_client_idle_s(tmp_path: Path, backend: RunningServer) -> None:
    idle = _serve(tmp_path, backend, timeouts="client_idle_s = 0.5")
    with idle as server, server.connect() as silent, server.connect() as served:
        served.sendall(_GET)
        assert _read_answer(served).startswith(b"HTTP/1.1 200 ")
        # Both reads end (b"") once the router closes; the sockets' 20 s timeout bounds them.
        assert _read_to_end(silent) == b""  # never sent a byte: closed all the same
        assert _read_to_end(served) == b""


@pytest.mark.slow
def test_the_idle_timeout_counts_from_the_last_answer(tmp_path: Path, backend: RunningServer) -> None:
    # One timer per connection re-arms itself lazily: requests spread over more than
    # `client_idle_s` (none of the gaps that long) keep the connection open, and once it is
    # idle it is closed all the same.
    idle = _serve(tmp_path, backend, timeouts="client_idle_s = 1.5")
    with idle as server, server.connect() as sock:
        for _ in range(8):  # ~2.4 s of requests, each gap well under 1.5 s
            sock.sendall(_GET)
            assert _read_answer(sock).startswith(b"HTTP/1.1 200 ")  # the same connection
            time.sleep(0.3)
        assert _read_to_end(sock) == b""


# ---- connections ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_connection_beyond_the_bound_gets_503_and_the_bound_frees_up(
    tmp_path: Path, backend: RunningServer
) -> None:
    with _serve(tmp_path, backend, limits="max_client_connections = 4") as server:
        held = [server.connect() for _ in range(4)]
        for sock in held:  # each one served, so the router has counted it
            sock.sendall(_GET)
            assert _read_answer(sock).startswith(b"HTTP/1.1 200 ")
        with server.connect() as extra:
            extra.sendall(_GET)  # as a client does at once: the answer must still be readable
            answer = _read_to_end(extra)
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b"retry-after: 1" in answer and b"Too many client connections" in answer
        for sock in held[1:]:  # the ones inside the bound are still open and served
            sock.sendall(_GET)
            assert _read_answer(sock).startswith(b"HTTP/1.1 200 ")
        held[0].close()
        wait_until(lambda: _answers(server), "a connection is served once one closed", timeout_s=10)
        for sock in held[1:]:
            sock.close()


@pytest.mark.slow
def test_serve_raises_its_open_files_limit_to_what_the_connection_bound_needs(
    tmp_path: Path, backend: RunningServer
) -> None:
    # A soft limit of 256 would cap client connections far below the configured 1,000.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    need = 1000 + 1024 + 64  # client bound, the upstream pool's default, the spare
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the hard open-files limit ({hard}) is below {need}")

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    with _serve(tmp_path, backend, "max_client_connections = 1000", preexec_fn=low_soft_limit) as server:
        assert server.open_files_limit() >= need


@pytest.mark.slow
def test_heads_split_into_single_bytes_or_pipelined_are_served(edge: Serve) -> None:
    # The head budget feeds the parser in pieces; a head cut anywhere, or two requests in one
    # write, must read exactly as uvicorn reads them.
    with edge.connect() as sock:
        for byte in _GET:
            sock.sendall(bytes([byte]))
        assert _read_answer(sock).startswith(b"HTTP/1.1 200 ")
        sock.sendall(_GET + _GET)
        answers = b""
        while answers.count(b"HTTP/1.1 200 ") < 2:  # bounded by the socket's 20 s timeout
            chunk = sock.recv(65536)
            assert chunk, answers
            answers += chunk


@pytest.mark.slow
def test_every_refusal_at_the_edge_is_counted_by_reason(tmp_path: Path, backend: RunningServer) -> None:
    limits = "max_head_bytes = 4096\nmax_headers = 5\nmax_client_connections = 3"
    timeouts = "client_head_s = 0.3\nclient_body_s = 0.3"
    with _serve(tmp_path, backend, limits, timeouts) as server:

        def refused(payload: bytes) -> bytes:
            with server.connect() as sock, contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(payload)
                return _read_to_end(sock)
            return b""

        assert refused(b"GET /v1/models HTTP/1.1\r\nX-Big: " + b"a" * 8192).startswith(b"HTTP/1.1 431 ")
        fields = b"".join(b"X-F%d: v\r\n" % index for index in range(8))
        assert refused(b"GET /v1/models HTTP/1.1\r\n" + fields + b"\r\n").startswith(b"HTTP/1.1 431 ")
        assert refused(b"GET /v1/models HTTP/1.1\r\nHost: r").startswith(b"HTTP/1.1 408 ")
        body_head = b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Length: 50\r\n\r\n{"
        assert refused(body_head).startswith(b"HTTP/1.1 408 ")
        held = [server.connect() for _ in range(3)]
        for sock in held:
            sock.sendall(_GET)
            assert _read_answer(sock).startswith(b"HTTP/1.1 200 ")
        assert refused(_GET).startswith(b"HTTP/1.1 503 ")
        for sock in held:
            sock.close()
        wait_until(lambda: _answers(server), "a connection is served again", timeout_s=10)
        page = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10).text
    counts = {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in page.splitlines()
        if line.startswith("irm_edge_refusals_total{")
    }
    assert counts == {
        "head_too_large": 1,
        "too_many_headers": 1,
        "head_timeout": 1,
        "body_timeout": 1,
        "too_many_connections": 1,
    }
