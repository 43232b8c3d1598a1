"""Pieces shared by the vLLM, Triton and TGI emulators.

Only mechanics live here (the admission gate, the filler text, SSE framing, Prometheus text); every
protocol detail (paths, bodies, error shapes, metric names) stays in the emulator that speaks it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PROMETHEUS_TEXT",
    "VOCAB",
    "EmulatorStats",
    "Histogram",
    "QueueFull",
    "Scheduler",
    "check",
    "count_tokens",
    "filler",
    "none_or_at_least",
    "prom_family",
    "render_chat",
    "sse",
]

# Filler vocabulary: every word has at most 4 characters, so each is exactly one token.
# fmt: off
VOCAB = (
    "the", "of", "and", "to", "in", "is", "it", "you", "that", "was", "for", "on", "are", "as",
    "with", "his", "they", "at", "be", "this", "from", "have", "or", "by", "one", "had", "not",
    "but", "what", "all", "were", "when", "we", "can", "said", "each", "she", "do", "how", "will",
    "up", "out", "many", "then", "them", "so", "some", "her", "make", "like", "him", "into", "time",
    "has", "look", "two", "more", "go", "see", "way", "could", "no", "than", "been", "call", "who",
    "its", "now", "long", "down", "day", "did", "get", "come", "made", "may", "part",
)
# fmt: on

# The Prometheus text exposition format, version 0.0.4 (what Triton and TGI serve).
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class EmulatorStats:
    """Counters a test can read directly (`app.state.emulator.stats`, a snapshot)."""

    received: int = 0
    """Inference requests that reached a handler (including ones answered with an error)."""
    running: int = 0
    """Requests holding a running slot now."""
    waiting: int = 0
    """Requests in the queue now."""
    completed: int = 0
    """Requests answered in full (finish_reason stop or length, or an embedding)."""
    failed: int = 0
    """Requests answered with an error status (validation, `fail_status`, queue full, overload)."""
    rejected: int = 0
    """Requests refused: queue full (503) or server overloaded (429); also counted in `failed`."""
    aborted: int = 0
    """Requests cut short: the client went away or a fault knob cut the response."""


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def check(ok: bool, message: str) -> None:
    """Raise `ValueError(message)` unless `ok` (config validation)."""
    if not ok:
        raise ValueError(message)


def none_or_at_least(value: int | None, low: int) -> bool:
    return value is None or value >= low


# ---------------------------------------------------------------------------------------------
# Text: tokenizer, filler answers, chat rendering, SSE
# ---------------------------------------------------------------------------------------------


def count_tokens(text: str) -> int:
    """Count tokens with the emulators' tokenizer: whitespace words cut into 4-character pieces."""
    return sum(math.ceil(len(word) / 4) for word in text.split())


def filler(key: str, natural_range: tuple[int, int], limit: int, ignore_eos: bool = False) -> list[str]:
    """A deterministic answer for `key` (seed and prompt): its "natural" length is drawn from
    `natural_range`, cut at `limit`. The answer hit the limit iff `len(result) == limit`."""
    rng = random.Random(key)
    natural = rng.randint(*natural_range)
    length = limit if ignore_eos or limit < natural else natural
    return [rng.choice(VOCAB) for _ in range(length)]


def render_chat(messages: Any) -> str:
    """Render messages with a trivial chat template: "role: content" lines, then "assistant:".

    Raises `ValueError` with a client-facing message when the messages are malformed.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: Field required (a non-empty list)")
    lines = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError("messages: each message needs a string 'role'")
        lines.append(f"{message['role']}: {_content_text(message.get('content'))}")
    return "\n".join([*lines, "assistant:"])


def _content_text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):  # Content parts; only text parts carry tokens here.
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    raise ValueError("messages: content should be a string or a list of parts")


def sse(payload: Any, space: bool = True) -> str:
    """One server-sent event. `space=False` writes `data:{...}` (older TGI builds, protocols.md §3)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n" if space else f"data:{data}\n\n"


# ---------------------------------------------------------------------------------------------
# Scheduler: a number of running slots, a bounded priority/FIFO queue for the rest
# ---------------------------------------------------------------------------------------------


class QueueFull(Exception):
    """A request would have to wait and the queue is at its bound."""


class Scheduler:
    """Admits requests in (priority, arrival) order; each waiter sleeps on its own future.

    `slots_of` and `queue_limit_of` are read on every decision, so a test may change the capacity
    at runtime (call `admit_threadsafe` after raising the slots). `queue_limit_of` returning None
    means an unbounded queue.

    Call `check_room()` and then `await acquire()` with no `await` in between: the event loop then
    cannot interleave another request, and the queue bound holds exactly.
    """

    def __init__(self, slots_of: Callable[[], int], queue_limit_of: Callable[[], int | None]) -> None:
        self._slots_of = slots_of
        self._queue_limit_of = queue_limit_of
        self._queue: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.running = 0

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def check_room(self) -> None:
        """Raise `QueueFull` when a new request would have to wait and the queue is full."""
        must_wait = self._queue or self.running >= self._slots_of()
        limit = self._queue_limit_of()
        if must_wait and limit is not None and len(self._queue) >= limit:
            raise QueueFull

    async def acquire(self, priority: int = 0) -> None:
        """Wait for a running slot. Cancelling the wait leaves the queue consistent."""
        self._loop = asyncio.get_running_loop()
        if not self._queue and self.running < self._slots_of():
            self.running += 1
            return
        entry = (priority, next(self._arrivals), self._loop.create_future())
        heapq.heappush(self._queue, entry)
        try:
            await entry[2]
        except asyncio.CancelledError:
            if entry[2].done() and not entry[2].cancelled():
                self.release()  # The slot was granted just before the cancel: hand it on.
            else:
                self._queue.remove(entry)
                heapq.heapify(self._queue)
            raise

    def release(self) -> None:
        self.running -= 1
        self.admit()

    def admit(self) -> None:
        """Start waiters while there are free slots (after a release or a capacity increase)."""
        while self._queue and self.running < self._slots_of():
            _, _, future = heapq.heappop(self._queue)
            self.running += 1
            future.set_result(None)

    def admit_threadsafe(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.admit)


# ---------------------------------------------------------------------------------------------
# Prometheus text written by hand
# ---------------------------------------------------------------------------------------------
# Triton (prometheus-cpp) and TGI (metrics-exporter-prometheus) name counters without the `_total`
# suffix that prometheus_client always adds, so those two emulators write the text themselves.

Labels = Mapping[str, str]


class Histogram:
    """Cumulative buckets, sum and count of one labelled histogram series."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(buckets)
        self._counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self._counts[index] += 1

    def samples(self, name: str, labels: Labels) -> list[tuple[str, Labels, float]]:
        out: list[tuple[str, Labels, float]] = [
            (f"{name}_bucket", {**labels, "le": _number(bound)}, count)
            for bound, count in zip(self.buckets, self._counts, strict=True)
        ]
        out.append((f"{name}_bucket", {**labels, "le": "+Inf"}, self.count))
        out += [(f"{name}_sum", labels, self.sum), (f"{name}_count", labels, self.count)]
        return out


def prom_family(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, Labels, float]]) -> str:
    """One metric family in the text format: HELP, TYPE, then the samples as given."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for sample_name, labels, value in samples:
        rendered = ",".join(f'{key}="{_escape(val)}"' for key, val in sorted(labels.items()))
        selector = f"{sample_name}{{{rendered}}}" if rendered else sample_name
        lines.append(f"{selector} {_number(value)}")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
