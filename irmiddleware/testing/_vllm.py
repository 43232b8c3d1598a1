"""A vLLM OpenAI-compatible server emulator (doc/protocols.md §1).

It answers the same paths with the same bodies, status codes, stream framing and Prometheus
metrics as vLLM, but "generates" deterministic filler text on a timing model instead of running a
model. It is a real ASGI app: serve it with `serve_in_thread` (or any ASGI server) and drive it over
HTTP. The service model, queue and step loop are the shared engine's (`_engine`); this module keeps
vLLM's paths, bodies, errors, stream framing and metric names.

Tokenizer. Text is split on whitespace and every word is cut into pieces of at most 4 characters;
each piece is one token: "hello world" is 4 tokens ("hell", "o", "worl", "d"), see `count_tokens`.
Chat messages are rendered as "role: content" lines plus a final "assistant:" line before counting.
Generated tokens are words of at most 4 characters, so re-tokenizing a response gives its `usage`.

Scheduling. At most `max_num_seqs` requests run at once; the rest wait in a queue ordered by
(`priority`, arrival) — plain FIFO unless priority scheduling is on. A running request sleeps for
its prefill (`time_per_request_s + uncached prompt tokens * time_per_prompt_token_s`), then one
`time_per_output_token_s` per generated token.

Prefix cache. With `prefix_cache_blocks > 0` the server keeps an LRU of prompt blocks
(`irmiddleware._prefix_cache`), as vLLM's automatic prefix caching does: the prompt text is cut
into blocks of `block_chars` characters (64 ≈ vLLM's 16-token blocks under this tokenizer) with
chained hashes. The longest cached prefix of a prompt skips its prefill;
`vllm:prefix_cache_queries_total` / `_hits_total` count prompt tokens and cached tokens, as vLLM does.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import math
import random
import struct
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from irmiddleware._prefix_cache import PrefixCache, block_hashes
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
from irmiddleware.testing._metrics import Metrics

__all__ = ["VLLMConfig", "VLLMEmulator", "create_vllm_app"]

# vLLM's own bucket boundaries for these histograms (vllm/v1/metrics/loggers.py).
# fmt: off
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# fmt: on

# Error "type" strings. vLLM uses these names for 400/404/500 (doc/protocols.md §1.4); the names for
# other statuses are our guess and unconfirmed.
_ERROR_TYPES = {
    400: "BadRequestError",
    401: "UnauthorizedError",
    404: "NotFoundError",
    429: "TooManyRequestsError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


# ---------------------------------------------------------------------------------------------
# Configuration and errors
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class VLLMConfig(TokenServiceModel):
    """How the emulated vLLM server behaves: the shared service model (`time_per_*`,
    `output_tokens_range`, `seed`, `fail_status`, `startup_delay_s`; `unhealthy` makes `/health`
    and `/ping` answer 503, as vLLM does when its engine died) plus vLLM's own fields. Every field
    is validated on creation.

    Fields may be changed at runtime through `app.state.emulator.config` (tests flip faults that
    way); prefer `VLLMEmulator.reconfigure`, which validates and applies capacity changes at once.
    """

    served_model_names: tuple[str, ...] = ("emulated-model",)
    """`--served-model-name`: the model ids that requests may name; the first labels the metrics."""
    embedding: bool = False
    """True for a pooling/embedding model: only `/v1/embeddings` works, generation APIs fail."""
    embedding_dim: int = 16
    """Length of every embedding vector."""
    max_model_len: int = 8192
    """Context window: prompt tokens plus `max_tokens` may not exceed it (400 otherwise)."""
    max_num_seqs: int = 256
    """Requests that run at once; later ones wait in the queue."""
    max_num_queued_reqs: int | None = None
    """Waiting-queue bound (vLLM >= 0.29 `--max-num-queued-reqs`); None = unbounded, the
    historical behaviour. A request arriving at a full queue gets 503 (doc/protocols.md §1.4)."""
    priority_scheduling: bool = False
    """`--scheduling-policy priority`: without it a non-zero `priority` field is a 400 (§1.6)."""
    api_key: str | None = None
    """`--api-key`: when set, `/v1*` needs `Authorization: Bearer <api_key>` (401 otherwise)."""
    enable_request_id_headers: bool = False
    """`--enable-request-id-headers`: echo (or create) an `X-Request-Id` response header."""
    version: str = "0.11.0"
    """What `GET /version` reports."""
    show_deprecated_metrics: bool = False
    """Also export `vllm:gpu_cache_usage_perc` (removed in vLLM 0.12). Read once, at app creation."""
    unsupported_api_status: int = 400
    """Status for e.g. embeddings on a generative model. vLLM answers 400 "The model does not
    support Embeddings API"; the newest code raises NotImplementedError, seen as 501 (unconfirmed)."""
    die_after_tokens: int | None = None
    """Fault knob: drop the connection after this many generated tokens, mid-response."""
    prefix_cache_blocks: int = 0
    """Prompt blocks the prefix cache holds (LRU); 0 disables it (every prompt is prefilled)."""
    block_chars: int = 64
    """Characters per prefix-cache block."""

    def __post_init__(self) -> None:
        self.served_model_names = tuple(self.served_model_names)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        check(
            bool(self.served_model_names) and all(self.served_model_names),
            "served_model_names must be non-empty strings",
        )
        self.at_least(0, "max_num_queued_reqs", "die_after_tokens", "prefix_cache_blocks")
        self.at_least(1, "embedding_dim", "max_model_len", "max_num_seqs", "block_chars")


class _RequestError(EmulatedError):
    """An error answered with vLLM's body: `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(status, message)
        self.param = param


class _EmulatedCrash(Exception):
    """Raised inside a response body to make uvicorn drop the connection (`die_after_tokens`)."""


def _error_response(error: EmulatedError) -> Response:
    # Shape since vLLM 0.10.1; `code` is the integer status (doc/protocols.md §1.4).
    status = error.status
    error_type = _ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    param = error.param if isinstance(error, _RequestError) else None
    body = {"error": {"message": error.message, "type": error_type, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


# ---------------------------------------------------------------------------------------------
# Metrics (doc/protocols.md §1.5)
# ---------------------------------------------------------------------------------------------


class _Metrics:
    """vLLM's Prometheus metrics, as prometheus_client writes them (vLLM exports with it)."""

    def __init__(self, model_name: str, show_deprecated: bool) -> None:
        self.metrics = m = Metrics(client_style=True, const_labels={"model_name": model_name, "engine": "0"})
        self.running = m.gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = m.gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = m.gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.gpu_usage = (
            m.gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.")
            if show_deprecated
            else None
        )
        self.prompt_tokens = m.counter("vllm:prompt_tokens", "Number of prefill tokens processed.").labels()
        self.generation_tokens = m.counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        ).labels()
        self.prefix_queries = m.counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        ).labels()
        self.prefix_hits = m.counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        ).labels()
        self.success = m.counter(
            "vllm:request_success", "Count of successfully processed requests.", "finished_reason"
        )
        for reason in ("stop", "length", "abort"):  # Exported from the first scrape, as in vLLM.
            self.success.labels(finished_reason=reason)
        self.ttft = m.histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", _TTFT_BUCKETS
        )
        self.e2e = m.histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            _LATENCY_BUCKETS,
        )
        self.queue_time = m.histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            _LATENCY_BUCKETS,
        )

    def render(self, running: int, waiting: int, max_num_seqs: int) -> str:
        """Export; gauges are set from the scheduler at scrape time so they can never drift."""
        self.running.labels().set(running)
        self.waiting.labels().set(waiting)
        # A stand-in for KV usage: the share of running slots in use, 0..1.
        usage = min(1.0, running / max_num_seqs)
        self.kv_usage.labels().set(usage)
        if self.gpu_usage is not None:
            self.gpu_usage.labels().set(usage)
        return self.metrics.render()


# ---------------------------------------------------------------------------------------------
# Parsed requests
# ---------------------------------------------------------------------------------------------


@dataclass
class _Choice:
    index: int
    words: list[str]
    finish_reason: str


@dataclass
class _Job(Job):
    """One validated generation request, ready to be scheduled (`prompt_tokens`, `priority`)."""

    chat: bool
    model: str
    response_id: str
    created: int
    prompts: list[str]
    choices: list[_Choice]
    stream: bool
    include_usage: bool
    continuous_usage: bool

    def __post_init__(self) -> None:
        # All prompts and samples decode together: the longest answer sets the steps.
        self.steps = max(len(choice.words) for choice in self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(len(choice.words) for choice in self.choices)


def _as_dict(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:  # too deep: unparsable
        raise _RequestError(400, f"JSON decode error: {error}") from None
    if not isinstance(body, dict):
        raise _RequestError(400, "Input should be a valid dictionary or object to extract fields from")
    return body


def _int_field(body: dict[str, Any], name: str, default: int | None, low: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _RequestError(400, f"{name}: Input should be a valid integer", name)
    if value < low:
        raise _RequestError(400, f"{name} must be at least {low}, got {value}.", name)
    return value


def _bool_field(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _RequestError(400, f"{name}: Input should be a valid boolean", name)
    return value


def _prompts_of(prompt: Any) -> list[str]:
    """Completions accept a string, a list of strings, token ids or a list of token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(item, str) for item in prompt):
            return list(prompt)
        if all(isinstance(item, int) for item in prompt):
            return [" ".join("tok" for _ in prompt)]  # One 3-character word per token id.
        if all(isinstance(item, list) and all(isinstance(t, int) for t in item) for item in prompt):
            return [" ".join("tok" for _ in item) for item in prompt]
    raise _RequestError(400, "prompt: Input should be a string or a list of strings or token ids", "prompt")


def _render_chat(messages: Any) -> str:
    try:
        return render_chat(messages)
    except ValueError as error:
        raise _RequestError(400, str(error), "messages") from None


# ---------------------------------------------------------------------------------------------
# The emulator
# ---------------------------------------------------------------------------------------------


class VLLMEmulator(Engine[VLLMConfig, _Job]):
    """State and handlers of one emulated vLLM server; reachable as `app.state.emulator`
    (`config`, `stats`, `reconfigure` from the shared engine)."""

    error = _RequestError

    def __init__(self, config: VLLMConfig) -> None:
        super().__init__(config)
        self._scheduler = Scheduler(lambda: self.config.max_num_seqs, lambda: self.config.max_num_queued_reqs)
        self._queues[None] = self._scheduler
        self._metrics = _Metrics(config.served_model_names[0], config.show_deprecated_metrics)
        self._prefix_cache = PrefixCache(config.prefix_cache_blocks)

    # -- plain endpoints (doc/protocols.md §1.1, §1.2) ---------------------------------------------

    async def health(self, request: Request) -> Response:
        return Response(status_code=503 if self.config.unhealthy else 200)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": self.config.version})

    async def load(self, request: Request) -> Response:
        # N counts in-flight inference requests: running plus waiting.
        return JSONResponse({"server_load": self._scheduler.running + self._scheduler.waiting})

    async def models(self, request: Request) -> Response:
        now = int(time.time())
        # vLLM's `root` is the model path; the emulator has none, so the first served name stands in.
        root = self.config.served_model_names[0]
        cards = [
            _model_card(name, root, now, self.config.max_model_len) for name in self.config.served_model_names
        ]
        return JSONResponse({"object": "list", "data": cards})

    async def metrics(self, request: Request) -> Response:
        body = self._metrics.render(
            self._scheduler.running, self._scheduler.waiting, self.config.max_num_seqs
        )
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    # -- inference endpoints (doc/protocols.md §1.3) -----------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._answer(request, self._generate, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._answer(request, self._generate, chat=True)

    async def embeddings(self, request: Request) -> Response:
        return await self._answer(request, self._embed, chat=False)

    async def _answer(
        self,
        request: Request,
        handler: Callable[[Request, dict[str, Any], bool], Awaitable[Response]],
        chat: bool,
    ) -> Response:
        """The engine's front door with vLLM's error body; headers on every success."""

        async def handle() -> Response:
            response = await handler(request, _as_dict(await request.body()), chat)
            self._add_headers(request, response)
            return response

        return await self._serve(handle, _error_response, request.headers.get("x-request-id"))

    def _queue_full(self, job: _Job) -> EmulatedError:
        # vLLM >= 0.29 rejects with 503 (doc/protocols.md §1.4); the exact message is unconfirmed.
        limit = self.config.max_num_queued_reqs
        return _RequestError(503, f"The waiting queue is full (max_num_queued_reqs={limit}).")

    def _add_headers(self, request: Request, response: Response) -> None:
        if self.config.enable_request_id_headers:
            response.headers["X-Request-Id"] = request.headers.get("x-request-id") or uuid.uuid4().hex
        load_format = request.headers.get("endpoint-load-metrics-format", "").lower()
        if load_format in ("text", "json"):
            response.headers["endpoint-load-metrics"] = self._orca_load(load_format)

    def _orca_load(self, load_format: str) -> str:
        # ORCA load report (doc/protocols.md §1.6; the first vLLM release with it is unconfirmed, and
        # so is the exact JSON layout).
        usage = min(1.0, self._scheduler.running / self.config.max_num_seqs)
        waiting = self._scheduler.waiting
        if load_format == "text":
            return (
                f"TEXT named_metrics.kv_cache_usage_perc={usage}, "
                f"named_metrics.num_requests_waiting={waiting}"
            )
        named = {"kv_cache_usage_perc": usage, "num_requests_waiting": waiting}
        return "JSON " + json.dumps({"named_metrics": named})

    # -- validation shared by all inference APIs ---------------------------------------------------

    def _check_model(self, body: dict[str, Any], api: str) -> str:
        # Route-level capability check first, as vLLM does before looking at the model name.
        if self.config.embedding != (api == "Embeddings"):
            raise _RequestError(self.config.unsupported_api_status, f"The model does not support {api} API")
        model = body.get("model")
        if model is None:  # vLLM defaults a missing model to the first served name.
            return self.config.served_model_names[0]
        if not isinstance(model, str):
            raise _RequestError(400, "model: Input should be a valid string", "model")
        if model not in self.config.served_model_names:
            raise _RequestError(404, f"The model `{model}` does not exist.", "model")
        return model

    def _check_priority(self, body: dict[str, Any]) -> int:
        priority = _int_field(body, "priority", 0, -(2**63)) or 0
        if priority != 0 and not self.config.priority_scheduling:
            # doc/protocols.md §1.6: non-zero priority needs `--scheduling-policy priority`.
            raise _RequestError(
                400, f"Got priority {priority} but Priority scheduling is not enabled.", "priority"
            )
        return priority

    def _response_id(self, prefix: str, request: Request, body: dict[str, Any]) -> str:
        # doc/protocols.md §1.6: X-Request-Id, else the body's request_id, else a random id.
        suffix = request.headers.get("x-request-id") or body.get("request_id") or uuid.uuid4().hex
        return f"{prefix}-{suffix}"

    # -- generation --------------------------------------------------------------------------------

    async def _generate(self, request: Request, body: dict[str, Any], chat: bool) -> Response:
        job = self._parse_generation(request, body, chat)
        self._check_room(job)
        if job.stream:
            # Like vLLM, the stream's headers go out at once; queueing happens inside the body.
            return StreamingResponse(self._stream(job), media_type="text/event-stream")
        if self.config.die_after_tokens is not None:
            return StreamingResponse(self._json_then_die(job), media_type="application/json")
        return JSONResponse(await self._run_whole(job))

    def _parse_generation(self, request: Request, body: dict[str, Any], chat: bool) -> _Job:
        model = self._check_model(body, "Chat Completions" if chat else "Completions")
        if chat:
            prompts = [_render_chat(body.get("messages"))]
            max_tokens = _int_field(body, "max_completion_tokens", None, 1)
        else:
            if "prompt" not in body:
                raise _RequestError(400, "prompt: Field required", "prompt")
            prompts = _prompts_of(body["prompt"])
            max_tokens = None
        if max_tokens is None:
            max_tokens = _int_field(body, "max_tokens", None, 1)
        n = _int_field(body, "n", 1, 1) or 1
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise _RequestError(400, "stream_options: Input should be an object", "stream_options")
        prompt_tokens = [count_tokens(prompt) for prompt in prompts]
        choices = self._choices(prompts, prompt_tokens, n, max_tokens, _bool_field(body, "ignore_eos"))
        return _Job(
            chat=chat,
            model=model,
            response_id=self._response_id("chatcmpl" if chat else "cmpl", request, body),
            created=int(time.time()),
            prompt_tokens=sum(prompt_tokens),
            prompts=prompts,
            choices=choices,
            priority=self._check_priority(body),
            stream=_bool_field(body, "stream"),
            include_usage=_bool_field(stream_options, "include_usage"),
            continuous_usage=_bool_field(stream_options, "continuous_usage_stats"),
        )

    def _choices(
        self, prompts: list[str], prompt_tokens: list[int], n: int, max_tokens: int | None, ignore_eos: bool
    ) -> list[_Choice]:
        choices: list[_Choice] = []
        for prompt, tokens in zip(prompts, prompt_tokens, strict=True):
            limit = self._check_context(tokens, max_tokens)
            for sample in range(n):
                words = self.config.answer(f"{prompt}:{sample}", limit, ignore_eos)
                choices.append(_Choice(len(choices), words, "length" if len(words) == limit else "stop"))
        return choices

    def _check_context(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """Return the effective max_tokens; vLLM defaults it to what is left of the context."""
        max_len = self.config.max_model_len
        wanted = max_tokens if max_tokens is not None else max_len - prompt_tokens
        if wanted < 1 or prompt_tokens + wanted > max_len:
            # Wording of vLLM's classic message; newer releases phrase it differently.
            raise _RequestError(
                400,
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{prompt_tokens + max(wanted, 0)} tokens ({prompt_tokens} in the messages, "
                f"{max(wanted, 0)} in the completion). "
                "Please reduce the length of the messages or completion.",
            )
        return wanted

    async def _run_whole(self, job: _Job) -> dict[str, Any]:
        """Run a non-streaming request to the end and build the response body."""
        await self._run(job)
        return _whole_body(job)

    async def _json_then_die(self, job: _Job) -> AsyncGenerator[str, None]:
        # A non-streaming body sent as a stream so that the headers are already out when
        # `die_after_tokens` strikes: the client then sees the connection drop mid-response.
        yield json.dumps(await self._run_whole(job))

    async def _stream(self, job: _Job) -> AsyncGenerator[str, None]:
        """Server-sent events: one chunk per token step, optional usage chunk, then [DONE]."""
        async with contextlib.aclosing(self._steps(job)) as steps:
            async for step in steps:
                if step == 0 and job.chat:
                    role = {"role": "assistant", "content": ""}
                    yield sse(self._usage_chunk(job, [_chat_delta(c.index, role) for c in job.choices], 0))
                choices = [_step_choice(job, c, step) for c in job.choices if step < len(c.words)]
                yield sse(
                    self._usage_chunk(job, choices, sum(min(step + 1, len(c.words)) for c in job.choices))
                )
        if job.include_usage:
            yield sse({**_chunk(job, []), "usage": openai_usage(job.prompt_tokens, job.completion_tokens)})
        yield "data: [DONE]\n\n"

    def _usage_chunk(self, job: _Job, choices: list[dict[str, Any]], tokens_so_far: int) -> dict[str, Any]:
        chunk = _chunk(job, choices)
        if job.include_usage and job.continuous_usage:  # vLLM's per-chunk running usage.
            chunk["usage"] = openai_usage(job.prompt_tokens, tokens_so_far)
        return chunk

    # -- the engine's hooks: vLLM's metrics, prefix cache and `die_after_tokens` -------------------

    def _admitted(self, job: _Job) -> None:
        self._metrics.queue_time.labels().observe(job.queued_s)

    def _prefill_s(self, job: _Job) -> float:
        return self.config.prefill_s(job.prompt_tokens - self._cached_tokens(job))

    def _cached_tokens(self, job: _Job) -> int:
        """Looks each prompt up in the prefix cache (then caches it); returns the prompt tokens
        whose prefill is skipped, and counts queries and hits in vLLM's metrics."""
        if self.config.prefix_cache_blocks == 0:
            return 0
        self._prefix_cache.capacity_blocks = self.config.prefix_cache_blocks  # May have been changed.
        cached = 0
        for prompt in job.prompts:
            blocks = block_hashes(prompt, self.config.block_chars)
            hit_blocks = self._prefix_cache.lookup_and_store(blocks)
            prompt_tokens = count_tokens(prompt)
            # Tokens of the cached characters: the prefix covered by whole cached blocks.
            cached += min(prompt_tokens, count_tokens(prompt[: hit_blocks * self.config.block_chars]))
        self._metrics.prefix_queries.inc(job.prompt_tokens)
        self._metrics.prefix_hits.inc(cached)
        return cached

    def _prefilled(self, job: _Job) -> None:
        self._metrics.prompt_tokens.inc(job.prompt_tokens)

    def _cut(self, job: _Job, tokens_done: int) -> None:
        die_after = self.config.die_after_tokens
        if die_after is not None and tokens_done >= die_after:
            raise _EmulatedCrash(f"die_after_tokens={die_after}")

    def _token(self, job: _Job, step: int) -> None:
        if step == 0:
            self._metrics.ttft.labels().observe(time.monotonic() - job.arrival)
        self._metrics.generation_tokens.inc(sum(step < len(c.words) for c in job.choices))

    def _finished(self, job: _Job, outcome: Outcome) -> None:
        self._metrics.e2e.labels().observe(time.monotonic() - job.arrival)
        reasons = [choice.finish_reason for choice in job.choices] if outcome == "completed" else ["abort"]
        for reason in reasons:
            self._metrics.success.labels(finished_reason=reason).inc()

    # -- embeddings --------------------------------------------------------------------------------

    async def _embed(self, request: Request, body: dict[str, Any], chat: bool) -> Response:
        model = self._check_model(body, "Embeddings")
        texts = _prompts_of(body["input"]) if "input" in body else None
        if texts is None:
            raise _RequestError(400, "input: Field required", "input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _RequestError(
                400, "encoding_format: Input should be 'float' or 'base64'", "encoding_format"
            )
        dimensions = body.get("dimensions")
        if dimensions is not None and dimensions != self.config.embedding_dim:
            message = "Model does not support matryoshka representation, changing output dimensions "
            raise _RequestError(400, message + "will lead to poor results.", "dimensions")
        tokens = [count_tokens(text) for text in texts]
        for count in tokens:
            if count > self.config.max_model_len:
                raise _RequestError(
                    400,
                    f"This model's maximum context length is {self.config.max_model_len} tokens. However, "
                    f"you requested {count} tokens in the input for embedding generation. "
                    "Please reduce the length of the input.",
                )
        job = _Job(
            chat=False,
            model=model,
            response_id=self._response_id("embd", request, body),
            created=int(time.time()),
            prompt_tokens=sum(tokens),
            prompts=texts,
            choices=[_Choice(0, [], "stop")],  # No tokens to generate: prefill only.
            priority=self._check_priority(body),
            stream=False,
            include_usage=False,
            continuous_usage=False,
        )
        self._check_room(job)
        await self._run(job)
        data = [
            {"index": i, "object": "embedding", "embedding": _embedding(self.config, text, encoding)}
            for i, text in enumerate(texts)
        ]
        # completion_tokens: 0 is unconfirmed for vLLM's embeddings usage (doc/protocols.md §1.3).
        return JSONResponse(
            {
                "id": job.response_id,
                "object": "list",
                "created": job.created,
                "model": model,
                "data": data,
                "usage": openai_usage(job.prompt_tokens, 0),
            }
        )


def _embedding(config: VLLMConfig, text: str, encoding: str) -> list[float] | str:
    """A deterministic unit vector (vLLM normalizes embeddings by default)."""
    rng = random.Random(f"{config.seed}:embed:{text}")
    vector = [rng.gauss(0.0, 1.0) for _ in range(config.embedding_dim)]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    vector = [v / norm for v in vector]
    if encoding == "base64":  # Little-endian float32, as the OpenAI API and vLLM encode it.
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def _model_card(name: str, root: str, created: int, max_model_len: int) -> dict[str, Any]:
    permission = {
        "id": f"modelperm-{uuid.uuid4().hex}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": None,
        "max_model_len": max_model_len,
        "permission": [permission],
    }


# -- response bodies -------------------------------------------------------------------------------


def _token_text(job: _Job, choice: _Choice, step: int) -> str:
    # Completions continue the prompt, so every token starts with a space; a chat answer does not.
    word = choice.words[step]
    return word if job.chat and step == 0 else f" {word}"


def _whole_body(job: _Job) -> dict[str, Any]:
    choices = []
    for choice in job.choices:
        text = "".join(_token_text(job, choice, step) for step in range(len(choice.words)))
        base = {
            "index": choice.index,
            "logprobs": None,
            "finish_reason": choice.finish_reason,
            "stop_reason": None,
        }
        if job.chat:
            choices.append({**base, "message": {"role": "assistant", "content": text, "tool_calls": []}})
        else:
            choices.append({**base, "text": text})
    whole = _envelope(job, "chat.completion" if job.chat else "text_completion", choices)
    return {**whole, "usage": openai_usage(job.prompt_tokens, job.completion_tokens)}


def _chunk(job: _Job, choices: list[dict[str, Any]]) -> dict[str, Any]:
    # Completion stream chunks keep object "text_completion", as in vLLM.
    return _envelope(job, "chat.completion.chunk" if job.chat else "text_completion", choices)


def _envelope(job: _Job, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    """The fields every OpenAI answer and stream chunk carries, in vLLM's order."""
    return {
        "id": job.response_id,
        "object": kind,
        "created": job.created,
        "model": job.model,
        "choices": choices,
    }


def _chat_delta(index: int, delta: dict[str, Any]) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}


def _step_choice(job: _Job, choice: _Choice, step: int) -> dict[str, Any]:
    text = _token_text(job, choice, step)
    if job.chat:
        body = _chat_delta(choice.index, {"content": text})
    else:
        body = {"index": choice.index, "text": text, "logprobs": None, "finish_reason": None}
    if step == len(choice.words) - 1:  # The last token carries the finish reason.
        body.update(finish_reason=choice.finish_reason, stop_reason=None)
    return body


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


class _AuthMiddleware:
    """`--api-key`: `/v1*` needs the bearer token, else 401 `{"error": "Unauthorized"}` (§1.4)."""

    def __init__(self, app: ASGIApp, emulator: VLLMEmulator) -> None:
        self._app = app
        self._emulator = emulator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self._emulator.config.api_key
        if (
            scope["type"] != "http"
            or key is None
            or not scope["path"].startswith("/v1")
            or scope["method"] == "OPTIONS"
        ):
            await self._app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if headers.get(b"authorization", b"").decode("latin-1") == f"Bearer {key}":
            await self._app(scope, receive, send)
            return
        await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)


class _DropEmulatedCrash(logging.Filter):
    """Keep uvicorn from logging a traceback for every connection `die_after_tokens` drops."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _EmulatedCrash))


_CRASH_FILTER = _DropEmulatedCrash()


def create_vllm_app(config: VLLMConfig | None = None, **overrides: Any) -> Starlette:
    """Build an ASGI app that behaves like a vLLM OpenAI-compatible server.

    Args:
        config: the service model; defaults to `VLLMConfig()`.
        **overrides: `VLLMConfig` fields to change, e.g. `max_num_seqs=1`.

    Returns:
        A Starlette app; its `VLLMEmulator` is `app.state.emulator` (config, stats, registry).
    """
    config = dataclasses.replace(config or VLLMConfig(), **overrides)
    emulator = VLLMEmulator(config)
    logging.getLogger("uvicorn.error").addFilter(_CRASH_FILTER)  # Idempotent: a set of filters.
    routes = [
        Route("/health", emulator.health, methods=["GET"]),
        Route("/ping", emulator.health, methods=["GET", "POST"]),  # SageMaker aliases (§1.1).
        Route("/version", emulator.version, methods=["GET"]),
        Route("/load", emulator.load, methods=["GET"]),
        Route("/metrics", emulator.metrics, methods=["GET"]),
        Route("/v1/models", emulator.models, methods=["GET"]),
        Route("/v1/completions", emulator.completions, methods=["POST"]),
        Route("/v1/chat/completions", emulator.chat_completions, methods=["POST"]),
        Route("/v1/embeddings", emulator.embeddings, methods=["POST"]),
        *control_routes(emulator),
    ]
    middleware = [Middleware(AbortOnDisconnect), Middleware(_AuthMiddleware, emulator=emulator)]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.emulator = emulator
    return app
