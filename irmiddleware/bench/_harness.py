"""What every benchmark needs and none should write again: free ports on 127.0.0.1, child processes
started and stopped around a measurement, an emulated vLLM backend as such a process, a process's
CPU time, percentiles, and plain-text tables.

Child processes are started with this interpreter, so they import the same irmiddleware; each is
ready when its `/v1/models` answers 200 (the proxy, the emulators and the bare app all answer it)
and is terminated, then killed if it does not stop, whatever happened in the measurement.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import IO

import httpx

_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0

# An emulated vLLM server: `python -c _VLLM PORT OPTIONS_JSON` (options are `create_vllm_app`'s).
_VLLM = """
import json, sys, uvicorn
from irmiddleware.testing import create_vllm_app
app = create_vllm_app(**json.loads(sys.argv[2]))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_url() -> str:
    """`http://127.0.0.1:PORT` on a free port."""
    return f"http://127.0.0.1:{free_port()}"


def port_of(url: str) -> str:
    return url.rpartition(":")[2]


@contextlib.contextmanager
def serving(
    args: Sequence[str], url: str, cpus: set[int] | None = None, stderr: IO[bytes] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Runs `python ARGS` until the block ends, once `url` answers `/v1/models`; on the CPUs
    `cpus` only, when given (set before the process starts, so every thread it makes inherits it);
    its stderr to `stderr` when given (else ours)."""
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    process = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=pin
    )
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{list(args[:2])} did not start on {url}")
            time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def emulated_vllm(
    url: str, *, max_num_seqs: int, time_per_output_token_s: float, **more: object
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """An emulated vLLM server on `url` serving model "m": `max_num_seqs` sequences at a time, each
    output token `time_per_output_token_s` (no other delay unless `more` config fields, e.g.
    `speed`, `time_per_prompt_token_s`, `prefix_cache_blocks`, say so), see `irmiddleware.testing`."""
    options = {
        "served_model_names": ["m"],
        "max_num_seqs": max_num_seqs,
        "time_per_request_s": 0.0,
        "time_per_prompt_token_s": 0.0,
        "time_per_output_token_s": time_per_output_token_s,
        **more,
    }
    return serving(["-c", _VLLM, port_of(url), json.dumps(options)], url)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (Linux: /proc/PID/stat)."""
    # utime and stime are fields 14 and 15, counted after the command name (which may hold spaces).
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants now (a launcher may run the router in a child process; a
    supervisor runs its workers)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as file:
                parents[int(entry)] = int(file.read().rpartition(")")[2].split()[1])
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def tree_cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time so far of the processes `pids` (from `process_tree`) that still run."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def quantile(values: Sequence[float], q: float) -> float:
    """The `q` quantile (q in hundredths: 0.5, 0.9, 0.99) of `values`, interpolated between the two
    nearest ranks (`statistics.quantiles(method="inclusive")`); NaN when there are no values.

    The simulator reports nearest-rank percentiles instead (`sim._stats.Percentiles`): every
    figure there is an observed latency, and equal seeds must give equal results."""
    if len(values) < 2:
        return values[0] if values else math.nan
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Columns as wide as their widest cell: the first `left` aligned left (names), the others
    right (figures)."""
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if column < left else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join(line(cells).rstrip() for cells in (header, *rows))
