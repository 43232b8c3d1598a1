"""`irmiddleware serve` with `[admin] listen`, as an operator runs it: a real process whose traffic port
serves no metrics or status while its admin port does; `irmiddleware admin` lists, drains and sets
through it (exit 1 with the router's message when refused, 3 when nothing listens); SIGHUP applies a
changed file (a backend added, a capacity changed, a backend drained and removed) and refuses a
broken one with one log line, changing nothing. Every wait is bounded."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from proxy_support import Emulators

from irmiddleware._cli import main as cli_main
from irmiddleware.testing import wait_until

pytestmark = pytest.mark.slow  # starts `irmiddleware serve` processes

TOKEN = "file-token-0123"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _write(path: Path, traffic: int, admin: int, token_file: Path, backends: list[tuple[str, int]]) -> None:
    lines = [
        "[router]",
        f'listen = "127.0.0.1:{traffic}"',
        "[router.health]",
        "interval_s = 0.1",
        "[admin]",
        f'listen = "127.0.0.1:{admin}"',
        f'token_file = "{token_file}"',
    ]
    for url, capacity in backends:
        lines += ["[[backends]]", f'url = "{url}"', f"capacity = {capacity}", 'models = ["m"]']
    path.write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def _serve(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    command = [sys.executable, "-m", "irmiddleware", "serve", "--config", str(config), "--log-level", "info"]
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command, stderr=stderr)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def _status(admin: str) -> dict[str, Any]:
    with contextlib.suppress(httpx.HTTPError):
        answer = httpx.get(f"{admin}/irm/status", timeout=1)
        if answer.status_code == 200:
            status: dict[str, Any] = answer.json()
            return status
    return {}


def _capacities(admin: str) -> dict[str, int]:
    return {b["url"]: b["capacity"] for b in _status(admin).get("backends", [])}


def test_admin_listener_cli_and_sighup(
    emulators: Emulators, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = emulators(2)
    traffic_port, admin_port = _port(), _port()
    traffic, admin = f"http://127.0.0.1:{traffic_port}", f"http://127.0.0.1:{admin_port}"
    token_file, config, log = tmp_path / "token", tmp_path / "router.toml", tmp_path / "serve.log"
    token_file.write_text(TOKEN + "\n")
    _write(config, traffic_port, admin_port, token_file, [(first.url, 8)])
    monkeypatch.delenv("IRM_ADMIN_TOKEN", raising=False)
    with _serve(config, log) as process:
        wait_until(lambda: _status(admin), "the admin listener answers", timeout_s=30)
        assert httpx.get(f"{traffic}/metrics").status_code == 404
        assert httpx.get(f"{traffic}/irm/status").status_code == 404
        assert "irm_backend_capacity" in httpx.get(f"{admin}/metrics").text

        # The CLI: refused without the token (exit 1, the router's message), then listing with it.
        assert cli_main(["admin", "--url", admin, "drain", "0"]) == 1
        assert "401" in capsys.readouterr().err
        cli = ["admin", "--url", admin, "--token-file", str(token_file)]
        assert cli_main([*cli, "list"]) == 0
        assert first.url in capsys.readouterr().out
        assert cli_main([*cli, "set", "0", "--weight", "3"]) == 0
        assert cli_main([*cli, "remove", "0"]) == 1 and "not drained" in capsys.readouterr().err
        assert cli_main(["admin", "--url", f"http://127.0.0.1:{_port()}", "list"]) == 3

        # SIGHUP: a backend added and a capacity changed.
        _write(config, traffic_port, admin_port, token_file, [(first.url, 16), (second.url, 4)])
        process.send_signal(signal.SIGHUP)
        want = {first.url: 16, second.url: 4}
        wait_until(lambda: _capacities(admin) == want, "the changed file applied", timeout_s=30)
        body = {"model": "m", "prompt": "Hi", "max_tokens": 2}
        assert all(httpx.post(f"{traffic}/v1/completions", json=body).status_code == 200 for _ in range(8))

        # SIGHUP: a backend no longer listed is drained, then removed.
        _write(config, traffic_port, admin_port, token_file, [(second.url, 4)])
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: _capacities(admin) == {second.url: 4}, "the backend removed", timeout_s=30)

        # SIGHUP with a broken file: one log line, nothing changes.
        config.write_text("[router\n")
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in log.read_text(), "the refusal is logged", timeout_s=30)
        assert _capacities(admin) == {second.url: 4}
        assert sum("reload refused" in line for line in log.read_text().splitlines()) == 1

        process.send_signal(signal.SIGTERM)
        assert process.wait(20) in (0, -signal.SIGTERM)


def test_a_missing_token_file_fails_the_start(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    _write(config, _port(), _port(), tmp_path / "absent", [("http://127.0.0.1:9", 8)])
    # `-X dev` shows ResourceWarnings: a start that fails leaves no native table unclosed.
    command = [sys.executable, "-X", "dev", "-m", "irmiddleware", "serve", "--config", str(config)]
    result = subprocess.run(command, capture_output=True, timeout=60, check=False)
    assert result.returncode == 2
    assert b"token file" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
