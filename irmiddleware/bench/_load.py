"""A saturating load generator for `bench-proxy --peers`: `loadgen.c`, compiled on first use.

Python clients cannot load a router written in Rust (or ours): one asyncio client tops out near
400 requests/s, so every router idles between requests and CPU per request mostly measures the
cost of waking up. `loadgen.c` is a few hundred lines of C: one thread per keep-alive connection,
blocking sockets, the same request bytes each time, responses read to their end by their framing
only (Content-Length or chunked, as SSE streams come). It is compiled with the Zig toolchain's C
compiler (the `ziglang` package, which builds the native core too) into a cache directory keyed
by the source's hash, so an edit recompiles it and nothing is built twice.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LoadResult", "http_request", "loadgen_binary", "run_load"]

_SOURCE = Path(__file__).with_name("loadgen.c")


@dataclass(frozen=True)
class LoadResult:
    """What one load run saw: responses read whole, of which not 2xx, connection errors."""

    responses: int
    non_2xx: int
    errors: int
    seconds: float
    p50_s: float

    @property
    def rate_per_s(self) -> float:
        return self.responses / self.seconds if self.seconds else 0.0


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "irmiddleware"


def loadgen_binary() -> Path:
    """The compiled load generator, built now if this source has not been built before.
    Raises RuntimeError when the `ziglang` package (its C compiler) is missing."""
    source = _SOURCE.read_bytes()
    target = _cache_dir() / f"loadgen-{hashlib.sha256(source).hexdigest()[:16]}"
    if target.exists():
        return target
    if importlib.util.find_spec("ziglang") is None:
        raise RuntimeError("the load generator is compiled with Zig's C compiler: pip install ziglang")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.partial")
    command = [sys.executable, "-m", "ziglang", "cc", "-O2", "-pthread", "-o", str(partial), str(_SOURCE)]
    # Zig keeps its own compile cache; a temporary working directory keeps it out of the caller's.
    subprocess.run(command, check=True, cwd=tempfile.gettempdir(), capture_output=True)
    partial.replace(target)
    return target


def run_load(
    url: str,
    request: bytes,
    *,
    connections: int,
    seconds: float,
    max_requests: int,
    rate: float = 0.0,
    cpus: set[int] | None = None,
) -> LoadResult:
    """Sends `request` (the whole HTTP/1.1 request's bytes) to `url` over `connections` keep-alive
    connections until `seconds` have passed or `max_requests` were sent, on `cpus` if given: as
    fast as the server answers, or paced at `rate` requests/s in all."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    with tempfile.NamedTemporaryFile(prefix="irm-request-", suffix=".http") as file:
        file.write(request)
        file.flush()
        command = [
            str(loadgen_binary()),
            host,
            port,
            file.name,
            str(connections),
            str(seconds),
            str(max_requests),
            str(rate),
        ]
        done = subprocess.run(
            command,
            check=True,
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
    return LoadResult(**json.loads(done.stdout))


def http_request(path: str, body: bytes, host: str = "127.0.0.1") -> bytes:
    """A keep-alive POST of a JSON body, as bytes to send again and again."""
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body
