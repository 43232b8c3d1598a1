"""A Hugging Face Text Generation Inference (TGI) router emulator (protocols.md §3).

It answers TGI's paths with TGI's bodies, headers, status codes, SSE framing and Prometheus
metrics, and "generates" deterministic filler text on a timing model instead of running a model.
One server serves one model (`model_id`), as TGI does.

Tokenizer and text are the vLLM emulator's (`irmiddleware.testing._common`): whitespace words cut
into 4-character pieces; generated tokens are filler words of at most 4 characters.

Scheduling. At most `max_batch_size` requests decode at once; the rest wait in the queue
(`tgi_queue_size`). Everything in flight (running plus queued) holds one of
`max_concurrent_requests` permits; a request that finds none is "overloaded" (§3.4): a non-streaming
call gets 429, a streaming one gets HTTP 200 and an error event, because TGI takes the permit
inside the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from irmiddleware.testing._common import (
    PROMETHEUS_TEXT,
    EmulatorStats,
    Histogram,
    QueueFull,
    Scheduler,
    check,
    count_tokens,
    filler,
    prom_family,
    render_chat,
    sse,
)

__all__ = ["TGIConfig", "TGIEmulator", "create_tgi_app"]

# TGI's duration buckets: 0.0001·1.5^k (protocols.md §3.5); the count of 35 is from TGI's
# `server.rs` as we recall it (unconfirmed).
_DURATION_BUCKETS = tuple(0.0001 * 1.5**k for k in range(1, 36))
_OVERLOADED = "Model is overloaded"


@dataclass
class TGIConfig:
    """How the emulated TGI server behaves. Every field is validated on creation; change fields at
    runtime with `TGIEmulator.reconfigure` (validated, and applies capacity changes at once)."""

    model_id: str = "emulated/model"
    """What `/info`, `/v1/models` and the chat `model` field report."""
    model_sha: str | None = None
    max_concurrent_requests: int = 128
    """Permits for requests in flight (running plus queued); beyond them → overloaded (§3.4)."""
    max_batch_size: int = 32
    """Requests decoding at once; more wait in the queue."""
    max_input_tokens: int = 1024
    """Longest prompt; longer → 422."""
    max_total_tokens: int = 2048
    """Prompt plus `max_new_tokens` may not exceed it (422)."""
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_client_batch_size: int = 4
    validation_workers: int = 2
    version: str = "3.3.6-dev0"
    """Router version in `/info` and in the chat `system_fingerprint`."""
    docker_label: str | None = None
    time_per_request_s: float = 0.01
    """Fixed part of prefill, after the request leaves the queue."""
    time_per_prompt_token_s: float = 0.0001
    time_per_output_token_s: float = 0.005
    """Decode time per generated token (one stream event per token)."""
    output_tokens_range: tuple[int, int] = (16, 64)
    """The "natural" answer length per prompt; shorter `max_new_tokens` ends with "length"."""
    seed: int = 0
    sse_space: bool = True
    """Write `data: {...}` (axum 0.7, TGI at db931fc); False writes `data:{...}` like older builds
    (protocols.md §3, framing correction). huggingface_hub needs the space before `[DONE]`."""
    api_key: str | None = None
    """`--api-key`: inference routes need `Authorization: Bearer <key>`, else 401 empty (§3.1)."""
    # Fault knobs.
    fail_status: int | None = None
    """Answer every inference request at once with this status and a TGI error body."""
    unhealthy: bool = False
    """`/health` (and `GET /`, `/ping`) answer 503 `{"error":"unhealthy","error_type":"healthcheck"}`."""
    startup_delay_s: float = 0.0
    """`serve_in_thread` keeps the port closed this long, like TGI warming up (§3.1)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` when a value is out of range."""
        check(bool(self.model_id), "model_id must be non-empty")
        for name in (
            "max_concurrent_requests",
            "max_batch_size",
            "max_input_tokens",
            "max_client_batch_size",
        ):
            check(getattr(self, name) >= 1, f"{name} must be >= 1")
        check(self.max_total_tokens > self.max_input_tokens, "max_total_tokens must exceed max_input_tokens")
        for name in ("time_per_request_s", "time_per_prompt_token_s", "time_per_output_token_s"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0")
        check(self.startup_delay_s >= 0, "startup_delay_s must be >= 0")
        low, high = self.output_tokens_range
        check(1 <= low <= high, "output_tokens_range must be (low, high) with 1 <= low <= high")
        check(self.fail_status is None or 400 <= self.fail_status <= 599, "fail_status must be an error")


class _TGIError(Exception):
    """An error answered with TGI's body `{"error", "error_type"}` (protocols.md §3.4)."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}


def _validation(message: str) -> _TGIError:
    return _TGIError(422, f"Input validation error: {message}", "validation")


@dataclass
class _Job:
    """One validated generation request."""

    prompt_tokens: int
    words: list[str]
    max_new_tokens: int
    details: bool
    arrival: float = field(default_factory=time.monotonic)
    queued_s: float = 0.0
    inference_s: float = 0.0

    @property
    def finish_reason(self) -> str:
        return "length" if len(self.words) == self.max_new_tokens else "eos_token"

    def token_text(self, step: int) -> str:
        return f" {self.words[step]}"  # Generation continues the prompt: every token has its space.

    @property
    def text(self) -> str:
        return "".join(self.token_text(step) for step in range(len(self.words)))


def _token(job: _Job, step: int) -> dict[str, Any]:
    # Token ids and logprobs are placeholders: the emulator has no vocabulary ids or model scores.
    return {"id": 1000 + step, "text": job.token_text(step), "logprob": -0.5, "special": False}


# ---------------------------------------------------------------------------------------------
# Metrics (protocols.md §3.5), written by hand: TGI's counters carry no `_total` suffix
# ---------------------------------------------------------------------------------------------


class _Metrics:
    def __init__(self, config: TGIConfig) -> None:
        self.count = 0
        self.success = 0
        self.failure: dict[str, int] = {}
        self.batch_count = {"prefill": 0, "decode": 0}
        self.histograms = {
            name: Histogram(_DURATION_BUCKETS)
            for name in ("request", "queue", "validation", "inference", "mean_time_per_token")
        }
        input_step = config.max_input_tokens / 100
        total_step = config.max_total_tokens / 100
        self.input_length = Histogram(input_step * (k + 1) for k in range(100))
        self.generated_tokens = Histogram(total_step * (k + 1) for k in range(100))
        self.max_new_tokens = Histogram(total_step * (k + 1) for k in range(100))

    def render(self, queue: int, batch: int, batch_tokens: int) -> str:
        parts = [
            prom_family("tgi_queue_size", "gauge", "Current queue size", [("tgi_queue_size", {}, queue)]),
            prom_family(
                "tgi_batch_current_size",
                "gauge",
                "Current batch size",
                [("tgi_batch_current_size", {}, batch)],
            ),
            prom_family(
                "tgi_batch_current_max_tokens",
                "gauge",
                "Maximum tokens for the current batch",
                [("tgi_batch_current_max_tokens", {}, batch_tokens)],
            ),
            _counter("tgi_request_count", "Total number of requests", {(): self.count}),
            _counter("tgi_request_success", "Number of successful requests", {(): self.success}),
            _counter("tgi_request_failure", "Number of failed requests", self._by("err", self.failure)),
            _counter(
                "tgi_batch_inference_count",
                "Inference calls per method",
                self._by("method", self.batch_count),
            ),
            _counter(
                "tgi_batch_inference_success",
                "Number of successful inference calls per method",
                self._by("method", self.batch_count),
            ),
        ]
        for short, hist in self.histograms.items():
            name = "tgi_request_duration" if short == "request" else f"tgi_request_{short}_duration"
            parts.append(prom_family(name, "histogram", f"Request {short} duration", hist.samples(name, {})))
        for name, hist in (
            ("tgi_request_input_length", self.input_length),
            ("tgi_request_generated_tokens", self.generated_tokens),
            ("tgi_request_max_new_tokens", self.max_new_tokens),
        ):
            parts.append(
                prom_family(name, "histogram", name.removeprefix("tgi_request_"), hist.samples(name, {}))
            )
        return "".join(parts)

    @staticmethod
    def _by(label: str, values: dict[str, int]) -> dict[tuple[tuple[str, str], ...], int]:
        return {((label, key),): value for key, value in values.items()}


def _counter(name: str, help_text: str, values: dict[tuple[tuple[str, str], ...], int]) -> str:
    return prom_family(name, "counter", help_text, [(name, dict(labels), v) for labels, v in values.items()])


# ---------------------------------------------------------------------------------------------
# The emulator
# ---------------------------------------------------------------------------------------------


class TGIEmulator:
    """State and handlers of one emulated TGI server; reachable as `app.state.emulator`."""

    def __init__(self, config: TGIConfig) -> None:
        self.config = config
        # Permits = running slots + queue places, so "no permit" is exactly "queue full" (§3.4).
        self._scheduler = Scheduler(self._slots, lambda: self.config.max_concurrent_requests - self._slots())
        self._metrics = _Metrics(config)
        self._tally = EmulatorStats()
        self._running_tokens = 0

    def _slots(self) -> int:
        return min(self.config.max_batch_size, self.config.max_concurrent_requests)

    @property
    def stats(self) -> EmulatorStats:
        """A snapshot of the request counters."""
        return dataclasses.replace(
            self._tally, running=self._scheduler.running, waiting=self._scheduler.waiting
        )

    def reconfigure(self, **changes: Any) -> TGIConfig:
        """Replace config fields (validated); more slots start waiters at once."""
        self.config = dataclasses.replace(self.config, **changes)
        self._scheduler.admit_threadsafe()
        return self.config

    # -- plain endpoints (protocols.md §3.1, §3.2, §3.5) -----------------------------------------

    async def health(self, request: Request) -> Response:
        if self.config.unhealthy:
            return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)
        return Response(status_code=200)

    async def info(self, request: Request) -> Response:
        c = self.config
        return JSONResponse(
            {
                "model_id": c.model_id,
                "model_sha": c.model_sha,
                "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": c.max_concurrent_requests,
                "max_best_of": c.max_best_of,
                "max_stop_sequences": c.max_stop_sequences,
                "max_input_tokens": c.max_input_tokens,
                "max_total_tokens": c.max_total_tokens,
                "validation_workers": c.validation_workers,
                "max_client_batch_size": c.max_client_batch_size,
                "router": "text-generation-router",
                "version": c.version,
                "sha": None,
                "docker_label": c.docker_label,
            }
        )

    async def models(self, request: Request) -> Response:
        model_id = self.config.model_id
        card = {"id": model_id, "object": "model", "created": 0, "owned_by": model_id}
        return JSONResponse({"object": "list", "data": [card]})

    async def metrics(self, request: Request) -> Response:
        text = self._metrics.render(self._scheduler.waiting, self._scheduler.running, self._running_tokens)
        return Response(text, media_type=PROMETHEUS_TEXT)

    # -- inference endpoints (protocols.md §3.3) -------------------------------------------------

    async def generate(self, request: Request) -> Response:
        return await self._answer(request, lambda body: self._generate(body, stream=False))

    async def generate_stream(self, request: Request) -> Response:
        return await self._answer(request, lambda body: self._generate(body, stream=True))

    async def compat(self, request: Request) -> Response:
        """`POST /`: `/generate` plus a `stream` flag; non-streaming answers a JSON array."""
        return await self._answer(request, self._compat)

    async def chat_completions(self, request: Request) -> Response:
        return await self._answer(request, lambda body: self._openai(body, chat=True))

    async def completions(self, request: Request) -> Response:
        return await self._answer(request, lambda body: self._openai(body, chat=False))

    async def _answer(self, request: Request, handler: Callable[[dict[str, Any]], Any]) -> Response:
        """Shared front door: auth, count, `fail_status`, JSON parsing, TGI's error body."""
        if not self._authorized(request):
            return Response(status_code=401)
        self._tally.received += 1
        self._metrics.count += 1
        try:
            if self.config.fail_status is not None:
                raise _TGIError(self.config.fail_status, "Emulated failure (fail_status).", "generation")
            body = await self._body(request)
            response: Response = await handler(body)
            return response
        except _TGIError as error:
            self._fail(error)
            return JSONResponse(error.body(), status_code=error.status)
        except _RawError as error:
            self._tally.failed += 1
            return PlainTextResponse(error.message, status_code=error.status)

    def _authorized(self, request: Request) -> bool:
        key = self.config.api_key
        return key is None or request.headers.get("authorization") == f"Bearer {key}"

    @staticmethod
    async def _body(request: Request) -> dict[str, Any]:
        # axum's Json extractor answers plain text: 400 for a syntax error, 422 for wrong data.
        try:
            body = json.loads(await request.body())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _RawError(400, f"Failed to parse the request body as JSON: {error}") from None
        if not isinstance(body, dict):
            raise _RawError(422, "Failed to deserialize the JSON body into the target type")
        return body

    def _fail(self, error: _TGIError) -> None:
        self._tally.failed += 1
        if error.error_type == "overloaded":
            self._tally.rejected += 1
        self._metrics.failure[error.error_type] = self._metrics.failure.get(error.error_type, 0) + 1

    # -- validation (TGI `validation.rs`) ----------------------------------------------------------

    def _job(self, prompt: str, max_new_tokens: Any, details: bool) -> _Job:
        started = time.monotonic()
        config = self.config
        if not prompt:
            raise _validation("`inputs` cannot be empty")
        tokens = count_tokens(prompt)
        if max_new_tokens is not None and (
            not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1
        ):
            raise _validation("`max_new_tokens` must be strictly positive")
        if tokens > config.max_input_tokens:
            raise _validation(
                f"`inputs` must have less than {config.max_input_tokens} tokens. Given: {tokens}"
            )
        limit = max_new_tokens if max_new_tokens is not None else config.max_total_tokens - tokens
        if tokens + limit > config.max_total_tokens:
            raise _validation(
                f"`inputs` tokens + `max_new_tokens` must be <= {config.max_total_tokens}. "
                f"Given: {tokens} `inputs` tokens and {limit} `max_new_tokens`"
            )
        words = filler(f"{config.seed}:{prompt}", config.output_tokens_range, limit)
        job = _Job(tokens, words, limit, details)
        self._metrics.histograms["validation"].observe(time.monotonic() - started)
        self._metrics.input_length.observe(tokens)
        self._metrics.max_new_tokens.observe(limit)
        return job

    def _generate_job(self, body: dict[str, Any]) -> _Job:
        inputs = body.get("inputs")
        if not isinstance(inputs, str):
            raise _RawError(
                422, "Failed to deserialize the JSON body into the target type: missing field `inputs`"
            )
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise _RawError(422, "Failed to deserialize the JSON body into the target type: parameters")
        return self._job(inputs, parameters.get("max_new_tokens"), bool(parameters.get("details")))

    # -- running ---------------------------------------------------------------------------------

    async def _steps(self, job: _Job) -> AsyncGenerator[int, None]:
        """Take a permit (or raise overloaded), queue, prefill, then yield each decode step."""
        try:
            self._scheduler.check_room()
        except QueueFull:
            raise _TGIError(429, _OVERLOADED, "overloaded") from None
        admitted = finished = False
        try:
            await self._scheduler.acquire()
            admitted = True
            self._running_tokens += job.prompt_tokens + job.max_new_tokens
            job.queued_s = time.monotonic() - job.arrival
            config = self.config
            await asyncio.sleep(
                config.time_per_request_s + job.prompt_tokens * config.time_per_prompt_token_s
            )
            self._metrics.batch_count["prefill"] += 1
            for step in range(len(job.words)):
                if step:
                    await asyncio.sleep(self.config.time_per_output_token_s)
                    self._metrics.batch_count["decode"] += 1
                yield step
            finished = True
        finally:
            if admitted:
                self._scheduler.release()
                self._running_tokens -= job.prompt_tokens + job.max_new_tokens
            self._finish(job, finished)

    def _finish(self, job: _Job, finished: bool) -> None:
        if not finished:
            self._tally.aborted += 1
            return
        now = time.monotonic()
        job.inference_s = now - job.arrival - job.queued_s
        self._tally.completed += 1
        self._metrics.success += 1
        hist = self._metrics.histograms
        hist["request"].observe(now - job.arrival)
        hist["queue"].observe(job.queued_s)
        hist["inference"].observe(job.inference_s)
        hist["mean_time_per_token"].observe(job.inference_s / max(1, len(job.words)))
        self._metrics.generated_tokens.observe(len(job.words))

    async def _run_whole(self, job: _Job) -> None:
        async with contextlib.aclosing(self._steps(job)) as steps:
            async for _ in steps:
                pass

    # -- /generate, /generate_stream, / ----------------------------------------------------------

    async def _generate(self, body: dict[str, Any], stream: bool) -> Response:
        job = self._generate_job(body)
        if stream:
            headers = {**self._headers(job, time.monotonic()), "X-Accel-Buffering": "no"}
            return StreamingResponse(self._events(job), media_type="text/event-stream", headers=headers)
        await self._run_whole(job)
        return JSONResponse(self._generate_body(job), headers=self._headers(job, time.monotonic()))

    async def _compat(self, body: dict[str, Any]) -> Response:
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _RawError(422, "Failed to deserialize the JSON body into the target type: stream")
        response = await self._generate(body, stream)
        if stream or response.status_code != 200:
            return response
        job_body = json.loads(bytes(response.body))
        return JSONResponse(
            [job_body], headers={k: v for k, v in response.headers.items() if k.startswith("x-")}
        )

    def _generate_body(self, job: _Job) -> dict[str, Any]:
        body: dict[str, Any] = {"generated_text": job.text}
        if job.details:  # Omitted unless requested (§3.3).
            body["details"] = {
                "finish_reason": job.finish_reason,
                "generated_tokens": len(job.words),
                "seed": None,
                "prefill": [],
                "tokens": [_token(job, step) for step in range(len(job.words))],
            }
        return body

    def _headers(self, job: _Job, now: float) -> dict[str, str]:
        total = now - job.arrival
        return {
            "x-compute-type": "gpu+optimized",
            "x-compute-time": str(total),
            "x-compute-characters": str(sum(len(w) for w in job.words)),
            "x-total-time": _ms(total),
            "x-validation-time": "0",
            "x-queue-time": _ms(job.queued_s),
            "x-inference-time": _ms(job.inference_s),
            "x-time-per-token": _ms(job.inference_s / max(1, len(job.words))),
            "x-prompt-tokens": str(job.prompt_tokens),
            "x-generated-tokens": str(len(job.words)),
        }

    async def _events(self, job: _Job) -> AsyncGenerator[str, None]:
        """`/generate_stream` events (§3.3): one per token, the last carries the text; no `[DONE]`."""
        space = self.config.sse_space
        try:
            async with contextlib.aclosing(self._steps(job)) as steps:
                async for step in steps:
                    last = step == len(job.words) - 1
                    event = {
                        "index": step + 1,
                        "token": _token(job, step),
                        "generated_text": job.text if last else None,
                        "details": self._stream_details(job) if last and job.details else None,
                    }
                    yield sse(event, space)
        except _TGIError as error:
            # The permit is taken inside the stream, so overload arrives under HTTP 200 (§3.4).
            self._fail(error)
            yield sse(error.body(), space)

    @staticmethod
    def _stream_details(job: _Job) -> dict[str, Any]:
        return {
            "finish_reason": job.finish_reason,
            "generated_tokens": len(job.words),
            "seed": None,
            "input_length": job.prompt_tokens,
        }

    # -- OpenAI-compatible routes (protocols.md §3.3) --------------------------------------------

    def _openai_job(self, body: dict[str, Any], chat: bool) -> _Job:
        prompt: Any
        if chat:
            try:
                prompt = render_chat(body.get("messages"))
            except ValueError as error:
                raise _RawError(
                    422, f"Failed to deserialize the JSON body into the target type: {error}"
                ) from None
        else:
            raw = body.get("prompt")
            prompt = raw[0] if isinstance(raw, list) and raw else raw
            if not isinstance(prompt, str):
                raise _RawError(422, "Failed to deserialize the JSON body into the target type: prompt")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        return self._job(prompt, max_tokens, details=False)

    async def _openai(self, body: dict[str, Any], chat: bool) -> Response:
        job = self._openai_job(body, chat)
        # `model`: "tgi" or absent is the base model, anything else a LoRA adapter id that falls
        # back to the base when unknown; the value is echoed back (§3.3).
        model = body.get("model") or self.config.model_id
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        meta = {
            "id": "",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": self._fingerprint(),
        }
        if body.get("stream"):
            events = self._openai_events(job, chat, meta, include_usage)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"X-Accel-Buffering": "no"}
            )
        await self._run_whole(job)
        reason = "length" if job.finish_reason == "length" else "stop"
        text = job.text.lstrip() if chat else job.text
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        kind = "chat.completion" if chat else "text_completion"
        return JSONResponse({"object": kind, **meta, "choices": [choice], "usage": _usage(job)})

    def _fingerprint(self) -> str:
        return f"{self.config.version}-{self.config.docker_label or 'native'}"

    async def _openai_events(
        self, job: _Job, chat: bool, meta: dict[str, Any], include_usage: bool
    ) -> AsyncGenerator[str, None]:
        """Chunks per token, an optional usage chunk, then `[DONE]` (§3.3)."""
        space = self.config.sse_space
        kind = "chat.completion.chunk" if chat else "text_completion"
        try:
            async with contextlib.aclosing(self._steps(job)) as steps:
                async for step in steps:
                    last = step == len(job.words) - 1
                    reason = ("length" if job.finish_reason == "length" else "stop") if last else None
                    text = job.words[step] if chat and step == 0 else job.token_text(step)
                    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
                    choice.update(
                        {"delta": {"role": "assistant", "content": text}} if chat else {"text": text}
                    )
                    yield sse({"object": kind, **meta, "choices": [choice], "usage": None}, space)
            if include_usage:
                yield sse({"object": kind, **meta, "choices": [], "usage": _usage(job)}, space)
        except _TGIError as error:
            # Streaming chat reports overload like this, under HTTP 200 (protocols.md §3.4).
            self._fail(error)
            yield sse({"error": {"message": error.message, "http_status_code": 422}}, space)
        yield sse("[DONE]", space)


class _RawError(Exception):
    """A plain-text rejection from axum's JSON extractor, before TGI's own validation."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _ms(seconds: float) -> str:
    return str(int(seconds * 1000))  # TGI reports whole milliseconds in its x-*-time headers.


def _usage(job: _Job) -> dict[str, int]:
    completion = len(job.words)
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": job.prompt_tokens + completion,
    }


def create_tgi_app(config: TGIConfig | None = None, **overrides: Any) -> Starlette:
    """Build an ASGI app that behaves like a TGI router.

    Args:
        config: the service model; defaults to `TGIConfig()`.
        **overrides: `TGIConfig` fields to change, e.g. `max_concurrent_requests=1`.

    Returns:
        A Starlette app; its `TGIEmulator` is `app.state.emulator` (config, stats).
    """
    emulator = TGIEmulator(dataclasses.replace(config or TGIConfig(), **overrides))
    routes = [
        Route("/", emulator.health, methods=["GET"]),
        Route("/", emulator.compat, methods=["POST"]),
        Route("/health", emulator.health, methods=["GET"]),
        Route("/ping", emulator.health, methods=["GET"]),
        Route("/info", emulator.info, methods=["GET"]),
        Route("/metrics", emulator.metrics, methods=["GET"]),
        Route("/v1/models", emulator.models, methods=["GET"]),
        Route("/generate", emulator.generate, methods=["POST"]),
        Route("/generate_stream", emulator.generate_stream, methods=["POST"]),
        Route("/v1/chat/completions", emulator.chat_completions, methods=["POST"]),
        Route("/v1/completions", emulator.completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.state.emulator = emulator
    return app
