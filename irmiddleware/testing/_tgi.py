"""A Hugging Face Text Generation Inference (TGI) router emulator (doc/protocols.md §3).

It answers TGI's paths with TGI's bodies, headers, status codes, SSE framing and Prometheus
metrics, and "generates" deterministic filler text on a timing model instead of running a model.
One server serves one model (`model_id`), as TGI does.

The service model, tokenizer, queue and step loop are the shared engine's (`_engine`): whitespace
words cut into 4-character pieces; generated tokens are filler words of at most 4 characters. This
module keeps TGI's paths, bodies, errors, stream framing and metric names.

Scheduling. At most `max_batch_size` requests decode at once; the rest wait in the queue
(`tgi_queue_size`). Everything in flight (running plus queued) holds one of
`max_concurrent_requests` permits; a request that finds none is "overloaded" (§3.4): a non-streaming
call gets 429, a streaming one gets HTTP 200 and an error event, because TGI takes the permit
inside the stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from irmiddleware.testing._control import AbortOnDisconnect, control_routes
from irmiddleware.testing._engine import (
    EmulatedError,
    Engine,
    Job,
    Outcome,
    Scheduler,
    TokenServiceModel,
    check,
    count_tokens,
    openai_usage,
    render_chat,
    sse,
)
from irmiddleware.testing._metrics import PROMETHEUS_TEXT, Metrics

__all__ = ["TGIConfig", "TGIEmulator", "create_tgi_app"]

# TGI's duration buckets: 0.0001·1.5^k (doc/protocols.md §3.5); the count of 35 is from TGI's
# `server.rs` as we recall it (unconfirmed).
_DURATION_BUCKETS = tuple(0.0001 * 1.5**k for k in range(1, 36))
_OVERLOADED = "Model is overloaded"


@dataclass(kw_only=True)
class TGIConfig(TokenServiceModel):
    """How the emulated TGI server behaves: the shared service model (`time_per_*`,
    `output_tokens_range`, `seed`, `fail_status`, `startup_delay_s`; `unhealthy` makes `/health`,
    `GET /` and `/ping` answer 503 `{"error":"unhealthy","error_type":"healthcheck"}`) plus TGI's own
    fields. Every field is validated on creation; change fields at runtime with
    `TGIEmulator.reconfigure` (validated, and applies capacity changes at once)."""

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
    sse_space: bool = True
    """Write `data: {...}` (axum 0.7, TGI at db931fc); False writes `data:{...}` like older builds
    (doc/protocols.md §3, framing correction). huggingface_hub needs the space before `[DONE]`."""
    api_key: str | None = None
    """`--api-key`: inference routes need `Authorization: Bearer <key>`, else 401 empty (§3.1)."""

    def validate(self) -> None:
        super().validate()
        check(bool(self.model_id), "model_id must be non-empty")
        self.at_least(
            1, "max_concurrent_requests", "max_batch_size", "max_input_tokens", "max_client_batch_size"
        )
        check(self.max_total_tokens > self.max_input_tokens, "max_total_tokens must exceed max_input_tokens")


class _TGIError(EmulatedError):
    """An error answered with TGI's body `{"error", "error_type"}` (doc/protocols.md §3.4)."""

    def __init__(self, status: int, message: str, error_type: str = "generation") -> None:
        super().__init__(status, message)
        self.error_type = error_type

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}


class _RawError(EmulatedError):
    """A plain-text rejection from axum's JSON extractor, before TGI's own validation."""


def _validation(message: str) -> _TGIError:
    return _TGIError(422, f"Input validation error: {message}", "validation")


@dataclass
class _Job(Job):
    """One validated generation request (`prompt_tokens`; `steps` is one per word)."""

    words: list[str]
    max_new_tokens: int
    details: bool
    inference_s: float = 0.0

    def __post_init__(self) -> None:
        self.steps = len(self.words)

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
# Metrics (doc/protocols.md §3.5): TGI's counters carry no `_total` suffix
# ---------------------------------------------------------------------------------------------


class _Metrics:
    def __init__(self, config: TGIConfig) -> None:
        self.metrics = m = Metrics()
        self.queue_size = m.gauge("tgi_queue_size", "Current queue size").labels()
        self.batch_size = m.gauge("tgi_batch_current_size", "Current batch size").labels()
        self.batch_tokens = m.gauge(
            "tgi_batch_current_max_tokens", "Maximum tokens for the current batch"
        ).labels()
        self.count = m.counter("tgi_request_count", "Total number of requests").labels()
        self.success = m.counter("tgi_request_success", "Number of successful requests").labels()
        self.failure = m.counter("tgi_request_failure", "Number of failed requests", "err")
        self._batches = (
            m.counter("tgi_batch_inference_count", "Inference calls per method", "method"),
            m.counter(
                "tgi_batch_inference_success", "Number of successful inference calls per method", "method"
            ),
        )
        for family in self._batches:
            for method in ("prefill", "decode"):
                family.labels(method=method)
        self.durations = {
            short: m.histogram(
                "tgi_request_duration" if short == "request" else f"tgi_request_{short}_duration",
                f"Request {short} duration",
                _DURATION_BUCKETS,
            ).labels()
            for short in ("request", "queue", "validation", "inference", "mean_time_per_token")
        }
        # Token-count histograms: 100 equal buckets up to the configured maximum.
        limits = {
            "input_length": config.max_input_tokens,
            "generated_tokens": config.max_total_tokens,
            "max_new_tokens": config.max_total_tokens,
        }
        self.lengths = {
            name: m.histogram(
                f"tgi_request_{name}", name, (limit / 100 * (k + 1) for k in range(100))
            ).labels()
            for name, limit in limits.items()
        }

    def batch(self, method: str) -> None:
        """One inference call of the batch, per `method` ("prefill" or "decode")."""
        for family in self._batches:
            family.labels(method=method).inc()

    def render(self, queue: int, batch: int, batch_tokens: int) -> str:
        self.queue_size.set(queue)
        self.batch_size.set(batch)
        self.batch_tokens.set(batch_tokens)
        return self.metrics.render()


# ---------------------------------------------------------------------------------------------
# The emulator
# ---------------------------------------------------------------------------------------------


class TGIEmulator(Engine[TGIConfig, _Job]):
    """State and handlers of one emulated TGI server; reachable as `app.state.emulator`
    (`config`, `stats`, `reconfigure` from the shared engine)."""

    error = _TGIError

    def __init__(self, config: TGIConfig) -> None:
        super().__init__(config)
        # Permits = running slots + queue places, so "no permit" is exactly "queue full" (§3.4).
        self._scheduler = Scheduler(self._slots, lambda: self.config.max_concurrent_requests - self._slots())
        self._queues[None] = self._scheduler
        self._metrics = _Metrics(config)
        self._running_tokens = 0

    def _slots(self) -> int:
        return min(self.config.max_batch_size, self.config.max_concurrent_requests)

    # -- plain endpoints (doc/protocols.md §3.1, §3.2, §3.5) ---------------------------------------

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

    # -- inference endpoints (doc/protocols.md §3.3) -----------------------------------------------

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

    async def _answer(
        self, request: Request, handler: Callable[[dict[str, Any]], Awaitable[Response]]
    ) -> Response:
        """The engine's front door behind TGI's auth; TGI's error bodies."""
        if not self._authorized(request):
            return Response(status_code=401)
        self._metrics.count.inc()

        async def handle() -> Response:
            return await handler(await self._body(request))

        return await self._serve(handle, self._error_response, request.headers.get("x-request-id"))

    def _error_response(self, error: EmulatedError) -> Response:
        if isinstance(error, _TGIError):
            self._metrics.failure.labels(err=error.error_type).inc()
            return JSONResponse(error.body(), status_code=error.status)
        return PlainTextResponse(error.message, status_code=error.status)

    def _authorized(self, request: Request) -> bool:
        key = self.config.api_key
        return key is None or request.headers.get("authorization") == f"Bearer {key}"

    @staticmethod
    async def _body(request: Request) -> dict[str, Any]:
        # axum's Json extractor answers plain text: 400 for a syntax error, 422 for wrong data.
        try:
            body = json.loads(await request.body())
        # serde_json stops at 128 levels of nesting ("recursion limit exceeded"), Python's parser
        # raises RecursionError somewhat deeper: either way the body is refused as unparsable.
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise _RawError(400, f"Failed to parse the request body as JSON: {error}") from None
        if not isinstance(body, dict):
            raise _RawError(422, "Failed to deserialize the JSON body into the target type")
        return body

    def _fail(self, error: _TGIError) -> None:
        """Count an error that a stream reports in-band (the front door counts the others)."""
        self._failed(error)
        self._metrics.failure.labels(err=error.error_type).inc()

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
        words = config.answer(prompt, limit)
        job = _Job(prompt_tokens=tokens, words=words, max_new_tokens=limit, details=details)
        self._metrics.durations["validation"].observe(time.monotonic() - started)
        self._metrics.lengths["input_length"].observe(tokens)
        self._metrics.lengths["max_new_tokens"].observe(limit)
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

    # -- the engine's hooks: TGI's batch metrics and overload --------------------------------------

    def _queue_full(self, job: _Job) -> EmulatedError:
        return _TGIError(429, _OVERLOADED, "overloaded")

    def _admitted(self, job: _Job) -> None:
        self._running_tokens += job.prompt_tokens + job.max_new_tokens

    def _prefilled(self, job: _Job) -> None:
        self._metrics.batch("prefill")

    def _token(self, job: _Job, step: int) -> None:
        if step:
            self._metrics.batch("decode")

    def _finished(self, job: _Job, outcome: Outcome) -> None:
        if job.started is not None:
            self._running_tokens -= job.prompt_tokens + job.max_new_tokens
        if outcome != "completed":
            return
        now = time.monotonic()
        job.inference_s = now - job.arrival - job.queued_s
        self._metrics.success.inc()
        durations = self._metrics.durations
        durations["request"].observe(now - job.arrival)
        durations["queue"].observe(job.queued_s)
        durations["inference"].observe(job.inference_s)
        durations["mean_time_per_token"].observe(job.inference_s / max(1, len(job.words)))
        self._metrics.lengths["generated_tokens"].observe(len(job.words))

    # -- /generate, /generate_stream, / ------------------------------------------------------------

    async def _generate(self, body: dict[str, Any], stream: bool) -> Response:
        job = self._generate_job(body)
        if stream:
            headers = {**self._headers(job, time.monotonic()), "X-Accel-Buffering": "no"}
            return StreamingResponse(self._events(job), media_type="text/event-stream", headers=headers)
        self._check_room(job)  # Overloaded: 429 (§3.4).
        await self._run(job)
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
            self._check_room(job)
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

    # -- OpenAI-compatible routes (doc/protocols.md §3.3) ------------------------------------------

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
        self._check_room(job)
        await self._run(job)
        reason = "length" if job.finish_reason == "length" else "stop"
        text = job.text.lstrip() if chat else job.text
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        kind = "chat.completion" if chat else "text_completion"
        return JSONResponse(
            {
                "object": kind,
                **meta,
                "choices": [choice],
                "usage": openai_usage(job.prompt_tokens, len(job.words)),
            }
        )

    def _fingerprint(self) -> str:
        return f"{self.config.version}-{self.config.docker_label or 'native'}"

    async def _openai_events(
        self, job: _Job, chat: bool, meta: dict[str, Any], include_usage: bool
    ) -> AsyncGenerator[str, None]:
        """Chunks per token, an optional usage chunk, then `[DONE]` (§3.3)."""
        space = self.config.sse_space
        kind = "chat.completion.chunk" if chat else "text_completion"
        try:
            self._check_room(job)
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
                yield sse(
                    {
                        "object": kind,
                        **meta,
                        "choices": [],
                        "usage": openai_usage(job.prompt_tokens, len(job.words)),
                    },
                    space,
                )
        except _TGIError as error:
            # Streaming chat reports overload like this, under HTTP 200 (doc/protocols.md §3.4).
            self._fail(error)
            yield sse({"error": {"message": error.message, "http_status_code": 422}}, space)
        yield sse("[DONE]", space)


def _ms(seconds: float) -> str:
    return str(int(seconds * 1000))  # TGI reports whole milliseconds in its x-*-time headers.


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
        *control_routes(emulator),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(AbortOnDisconnect)])
    app.state.emulator = emulator
    return app
