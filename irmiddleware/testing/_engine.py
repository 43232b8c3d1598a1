"""The engine the vLLM, Triton and TGI emulators share: service model, queues, step loop, counters.

A protocol module (`_vllm`, `_triton`, `_tgi`) keeps only what its server says: paths, bodies,
errors, stream framing and metric names. Everything about *serving* is here, once: the config fields
every emulator has and their validation (`ServiceModel`), the tokenizer and filler answers, the
bounded priority queue (`Scheduler`), the loop that queues a request, prefills it and yields its
decode steps (`Engine._steps`), the request counters (`EmulatorStats`) and `reconfigure`. A timing
change is made here and holds for all three emulators; the prefix cache the vLLM emulator keeps is
`irmiddleware._prefix_cache`, the one the simulator uses too.

Dependencies point one way: the protocol modules import this module, and it imports only the
standard library (no Starlette, no uvicorn, no protocol): what a server does with a request is kept
apart from how it speaks, so a protocol change cannot reach the timing model or the reverse.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import json
import math
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

__all__ = [
    "VOCAB",
    "EmulatedError",
    "EmulatorStats",
    "Engine",
    "Job",
    "Outcome",
    "QueueFull",
    "Scheduler",
    "ServiceModel",
    "TokenServiceModel",
    "count_tokens",
    "filler",
    "openai_usage",
    "render_chat",
    "sse",
]

# ---------------------------------------------------------------------------------------------
# Text: tokenizer, filler answers, chat rendering, SSE
# ---------------------------------------------------------------------------------------------

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


def openai_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The OpenAI `usage` object that vLLM and TGI both answer on their `/v1` routes."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def sse(payload: Any, space: bool = True) -> str:
    """One server-sent event. `space=False` writes `data:{...}` (older TGI builds, doc/protocols.md §3)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n" if space else f"data:{data}\n\n"


# ---------------------------------------------------------------------------------------------
# The service model: what every emulator's config has
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ServiceModel(abc.ABC):
    """The fields every emulator's config shares, validated on creation and by `reconfigure`.

    A request waits for a slot, then pays `prefill_s` (the first token comes with it) and
    `decode_s` per further token. Each protocol's config adds its capacity and protocol fields.
    """

    time_per_request_s: float = 0.01
    """Fixed part of prefill (a tensor model's whole execution), paid once the request runs."""
    output_tokens_range: tuple[int, int] = (16, 64)
    """The "natural" answer length is drawn from this inclusive range per prompt; a request with a
    smaller token limit ends with a "length" finish reason."""
    seed: int = 0
    """Seeds the filler text and the answer lengths (all deterministic)."""
    # Fault knobs.
    fail_status: int | None = None
    """Answer every inference request at once with this status, in the protocol's error body."""
    unhealthy: bool = False
    """The health endpoints report failure (each protocol's config says how)."""
    startup_delay_s: float = 0.0
    """`serve_in_thread` keeps the port bound but not listening this long (connection refused),
    like a server loading its model."""
    speed: float = 1.0
    """Every prefill and decode step takes its time over `speed` (0.5: twice as slow); changed
    with `reconfigure(speed=...)` it takes effect at the next step (a noisy neighbour, thermal
    throttling, and back)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` when a value is out of range. Subclasses extend it."""
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name.endswith("_s"):  # Every duration, by the naming convention.
                check(value >= 0, f"{item.name} must be >= 0")
            elif item.name.endswith("_status"):
                check(value is None or 400 <= value <= 599, f"{item.name} must be an HTTP error status")
        check(math.isfinite(self.speed) and self.speed > 0, "speed must be a finite number > 0")
        low, high = self.output_tokens_range
        check(1 <= low <= high, "output_tokens_range must be (low, high) with 1 <= low <= high")

    def at_least(self, low: int, *names: str) -> None:
        """Raise `ValueError` unless each named field is None or at least `low`."""
        for name in names:
            value = getattr(self, name)
            check(value is None or value >= low, f"{name} must be >= {low}")

    def answer(self, prompt: str, limit: int, ignore_eos: bool = False) -> list[str]:
        """The filler words answering `prompt` (deterministic for `seed`), at most `limit`."""
        return filler(f"{self.seed}:{prompt}", self.output_tokens_range, limit, ignore_eos)

    def prefill_s(self, prompt_tokens: int) -> float:
        """Time from taking a slot to the first token."""
        return self.time_per_request_s

    @abc.abstractmethod
    def decode_s(self) -> float:
        """Time per generated token after the first."""


@dataclass(kw_only=True)
class TokenServiceModel(ServiceModel):
    """The service model of an LLM server (vLLM, TGI): prefill also costs per prompt token."""

    time_per_prompt_token_s: float = 0.0001
    """Prefill time per (uncached) prompt token."""
    time_per_output_token_s: float = 0.005
    """Decode time per generated token (one stream chunk per token)."""

    def prefill_s(self, prompt_tokens: int) -> float:
        return self.time_per_request_s + prompt_tokens * self.time_per_prompt_token_s

    def decode_s(self) -> float:
        return self.time_per_output_token_s


def check(ok: bool, message: str) -> None:
    """Raise `ValueError(message)` unless `ok` (config validation)."""
    if not ok:
        raise ValueError(message)


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
    """Requests refused because the queue was full; also counted in `failed`."""
    aborted: int = 0
    """Requests cut short: the client went away or a fault knob cut the response."""
    in_progress: int = 0
    """Requests the engine holds now, waiting or running: from the moment one enters the queue
    until its run ends, in full, with an error, or because the engine noticed that its client went
    away and stopped. What a router's capacity for this server must bound."""
    peak_in_progress: int = 0
    """The most requests ever in progress at once (since start, or the last `reset_peak`)."""
    repeated_ids: int = 0
    """Receipts of a request id (the `x-request-id` header) already received before: a request
    sent to this server more than once."""
    last_request_id: str | None = None
    """The request id (`x-request-id` header) of the latest inference request; None if it had none."""


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
# The engine: front door, step loop, counters
# ---------------------------------------------------------------------------------------------


class EmulatedError(Exception):
    """An error the emulated server answers; each protocol subclasses it with its body's fields."""

    rejected = False
    """Set when the queue was full: the request also counts as rejected."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Outcome = Literal["completed", "failed", "aborted"]
"""How a request's run ended: in full; with an `EmulatedError` (counted where it is answered);
or cut short (client gone, cancelled, a fault knob)."""


@dataclass(kw_only=True)
class Job:
    """What the engine needs of a request; each protocol subclasses it with its own fields."""

    prompt_tokens: int = 0
    """Prompt tokens to prefill (the engine's `_prefill_s` may skip cached ones)."""
    steps: int = 0
    """Decode steps: the first comes with the prefill, each later one costs `decode_s`."""
    priority: int = 0
    """Lower runs first; equal priorities in arrival order."""
    queue: Hashable = None
    """Which of the engine's queues it waits in (Triton keeps one per model version)."""
    arrival: float = field(default_factory=time.monotonic)
    started: float | None = None
    """When it took a slot (`time.monotonic()`); None while waiting, or if it never ran."""

    @property
    def queued_s(self) -> float:
        """How long it waited for its slot (0 until it has one)."""
        return 0.0 if self.started is None else self.started - self.arrival


_IDS_KEPT = 1_000_000
"""Request ids remembered for `EmulatorStats.repeated_ids` (the oldest are forgotten first)."""

C = TypeVar("C", bound=ServiceModel)
J = TypeVar("J", bound=Job)
R = TypeVar("R")


class Engine(abc.ABC, Generic[C, J]):
    """What every emulator does with a request, whatever its protocol: count it, queue it, run it
    step by step on the service model, and keep its counters right however it ends.

    A protocol's emulator subclasses it, builds its `Job`s, registers its queues in `_queues`, and
    overrides the hooks below where its server counts something (all but `_queue_full` default to
    nothing); it never writes a timing loop itself.
    """

    error: ClassVar[type[EmulatedError]] = EmulatedError
    """The protocol's error class, raised for `fail_status`."""

    def __init__(self, config: C) -> None:
        self.config = config
        self._tally = EmulatorStats()
        self._queues: dict[Hashable, Scheduler] = {}
        self._ids: dict[str, None] = {}  # the latest `_IDS_KEPT` request ids, oldest first

    @property
    def stats(self) -> EmulatorStats:
        """A snapshot of the request counters (summed over all queues)."""
        running = sum(queue.running for queue in self._queues.values())
        waiting = sum(queue.waiting for queue in self._queues.values())
        return dataclasses.replace(self._tally, running=running, waiting=waiting)

    def reset_peak(self) -> None:
        """Starts `peak_in_progress` over from the requests in progress now."""
        self._tally.peak_in_progress = self._tally.in_progress

    def reconfigure(self, **changes: Any) -> C:
        """Replace config fields (validated); more slots start waiting requests at once."""
        self.config = dataclasses.replace(self.config, **changes)
        self._reconfigured()
        for queue in self._queues.values():
            queue.admit_threadsafe()
        return self.config

    # -- front door --------------------------------------------------------------------------------

    async def _serve(
        self,
        handle: Callable[[], Awaitable[R]],
        render: Callable[[EmulatedError], R],
        request_id: str | None = None,
    ) -> R:
        """Count the request (and its `request_id`, the client's `x-request-id`), apply
        `fail_status`, and answer an `EmulatedError` with `render`."""
        self._tally.received += 1
        self._tally.last_request_id = request_id or None
        if request_id:
            self._count_id(request_id)
        try:
            if self.config.fail_status is not None:
                raise self.error(self.config.fail_status, "Emulated failure (fail_status).")
            return await handle()
        except EmulatedError as error:
            self._failed(error)
            return render(error)

    def _count_id(self, request_id: str) -> None:
        ids = self._ids
        if request_id in ids:
            self._tally.repeated_ids += 1
            return
        ids[request_id] = None
        if len(ids) > _IDS_KEPT:  # bounded memory on a long-running server
            del ids[next(iter(ids))]

    def _failed(self, error: EmulatedError) -> None:
        """Count a request answered with `error` (also where a stream reports it in-band)."""
        self._tally.failed += 1
        if error.rejected:
            self._tally.rejected += 1

    def _check_room(self, job: J) -> None:
        """Raise the protocol's queue-full error (`_queue_full`) when `job` would find the queue
        full. Call it with no `await` before `_steps` starts, so the bound holds exactly."""
        try:
            self._queues[job.queue].check_room()
        except QueueFull:
            error = self._queue_full(job)
            error.rejected = True
            raise error from None

    # -- the step loop -----------------------------------------------------------------------------

    async def _steps(self, job: J) -> AsyncGenerator[int, None]:
        """Wait for a slot, prefill, then yield each decode step's index (0 comes with the
        prefill); the slot, the counters and `_finished` are settled however the run ends."""
        queue = self._queues[job.queue]
        outcome: Outcome = "aborted"
        tally = self._tally
        tally.in_progress += 1
        tally.peak_in_progress = max(tally.peak_in_progress, tally.in_progress)
        try:
            await queue.acquire(job.priority)
            job.started = time.monotonic()
            self._admitted(job)
            await asyncio.sleep(self._prefill_s(job) / self.config.speed)
            self._prefilled(job)
            for step in range(job.steps):
                if step:
                    await _engine_step(self.config.decode_s() / self.config.speed)
                self._cut(job, step)
                self._token(job, step)
                yield step
            self._cut(job, job.steps)
            outcome = "completed"
        except EmulatedError:
            outcome = "failed"
            raise
        finally:
            tally.in_progress -= 1
            if job.started is not None:
                queue.release()
            if outcome == "completed":
                self._tally.completed += 1
            elif outcome == "aborted":
                self._tally.aborted += 1
            self._finished(job, outcome)

    async def _run(self, job: J) -> None:
        """Run `job` to its end (a response that is not streamed)."""
        async with contextlib.aclosing(self._steps(job)) as steps:
            async for _ in steps:
                pass

    # -- hooks -------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _queue_full(self, job: J) -> EmulatedError:
        """The protocol's answer to a request that finds the queue full."""

    def _reconfigured(self) -> None:
        """The config was replaced (e.g. Triton adds queues for new models)."""

    def _admitted(self, job: J) -> None:
        """`job` took a slot (`job.started` is set)."""

    def _prefill_s(self, job: J) -> float:
        """The prefill time of `job`; the vLLM emulator skips cached prompt tokens."""
        return self.config.prefill_s(job.prompt_tokens)

    def _prefilled(self, job: J) -> None:
        """The prefill is done; the first token is next."""

    def _cut(self, job: J, tokens_done: int) -> None:
        """A fault knob may end the response here, before token `tokens_done` and after the last,
        by raising (an `EmulatedError` counts as failed, anything else as aborted)."""

    def _token(self, job: J, step: int) -> None:
        """Token `step` is about to be yielded."""

    def _finished(self, job: J, outcome: Outcome) -> None:
        """The run ended (`job.started` is None if it never took a slot)."""


async def _engine_step(seconds: float) -> None:
    """One decode step. A cancellation (the client went away) takes effect at the end of the step,
    not in the middle: an engine runs a step for the whole batch and drops an aborted request
    between steps, so a server goes on counting it in progress until then. (In the queue or in its
    prefill, a request stops at once.)"""
    step = asyncio.ensure_future(asyncio.sleep(seconds))
    try:
        await asyncio.shield(step)
    except asyncio.CancelledError:
        await step  # the rest of the step; a second cancellation ends it at once
        raise
