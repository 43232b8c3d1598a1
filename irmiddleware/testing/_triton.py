"""An NVIDIA Triton Inference Server emulator: KServe v2 HTTP plus Triton's extensions (doc/protocols.md §2).

It answers Triton's paths with Triton's bodies, status codes and stream framing, including the
binary tensor extension that `tritonclient.http` uses by default, and serves Triton's Prometheus
metrics on a separate app (Triton's port 8002). It runs no model; instead:

- A tensor model computes `OUTPUTk = INPUTk + 1` for numeric tensors (integers wrap like the
  C types they are; BOOL and BYTES are echoed). Output k pairs with input k.
- A generative model (`TritonModel.text_generator`) takes `text_input` (BYTES) and an optional
  `max_tokens` (INT32) and answers `text_output` with deterministic filler text, one token per
  `time_per_token_s`; `/generate` and `/generate_stream` are meant for it.

Scheduling, timing and counters are the shared engine's (`_engine`); this module keeps Triton's
paths, bodies, errors, stream framing and metric names. Each model version has `max_concurrency`
execution slots (Triton's instance count; the dynamic batcher's merging of requests is not
emulated) and a queue bounded by `max_queue_size` (0 = unbounded, as in Triton's
`default_queue_policy`). A request arriving at a full queue gets 503 "Exceeds maximum queue size".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import struct
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from irmiddleware.testing._control import AbortOnDisconnect, control_routes
from irmiddleware.testing._engine import (
    EmulatedError,
    Engine,
    Job,
    Outcome,
    Scheduler,
    ServiceModel,
    check,
    sse,
)
from irmiddleware.testing._metrics import PROMETHEUS_TEXT, Family, Metrics, Value

__all__ = [
    "TritonConfig",
    "TritonEmulator",
    "TritonModel",
    "TritonTensor",
    "create_triton_app",
    "create_triton_metrics_app",
]

# struct formats of the fixed-size datatypes, little-endian on the wire (doc/protocols.md §2.3).
_FORMATS = {
    "BOOL": "?",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
}
_DATATYPES = frozenset({*_FORMATS, "BYTES"})
_UNKNOWN_ID = "<id_unknown>"
_FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TritonTensor:
    """One input or output of a model, as in its config (`dims` exclude the batch dimension)."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = False
    """An input the request may leave out (Triton's `optional: true`)."""

    def __post_init__(self) -> None:
        check(bool(self.name), "tensor name must be non-empty")
        check(self.datatype in _DATATYPES, f"unknown datatype {self.datatype!r}")
        check(all(d == -1 or d >= 1 for d in self.dims), f"dims of {self.name} must be -1 or >= 1")


@dataclass(frozen=True)
class TritonModel:
    """One model of the emulated repository."""

    name: str
    inputs: tuple[TritonTensor, ...] = (TritonTensor("INPUT0", "FP32", (16,)),)
    outputs: tuple[TritonTensor, ...] = (TritonTensor("OUTPUT0", "FP32", (16,)),)
    versions: tuple[str, ...] = ("1",)
    platform: str = "onnxruntime_onnx"
    max_batch_size: int = 0
    """> 0 adds a leading batch dimension (-1 in metadata) of at most this size."""
    max_concurrency: int = 1
    """Requests that execute at once (the instance-group count)."""
    max_queue_size: int = 0
    """Dynamic-batcher queue bound; 0 = unbounded (Triton's default). Full queue → 503."""
    generative: bool = False
    """Generates text from `text_input` instead of computing `input + 1`."""

    def __post_init__(self) -> None:
        check(bool(self.name), "model name must be non-empty")
        check(bool(self.versions) and all(v.isdigit() for v in self.versions), "versions must be digits")
        check(self.max_batch_size >= 0, "max_batch_size must be >= 0")
        check(self.max_concurrency >= 1, "max_concurrency must be >= 1")
        check(self.max_queue_size >= 0, "max_queue_size must be >= 0")
        check(bool(self.inputs) and bool(self.outputs), "a model needs inputs and outputs")
        if self.generative:
            check(self.input("text_input") is not None, "a generative model needs a text_input input")
            check(self.output("text_output") is not None, "a generative model needs a text_output output")
        else:
            check(len(self.outputs) <= len(self.inputs), "each output pairs with the input at its index")
            for inp, out in zip(self.inputs, self.outputs, strict=False):
                check(inp.datatype == out.datatype, f"{out.name} must have the datatype of {inp.name}")

    @classmethod
    def text_generator(cls, name: str, **fields: Any) -> TritonModel:
        """A model shaped like Triton's vLLM/TRT-LLM ensembles: text_input, max_tokens → text_output."""
        inputs = (TritonTensor("text_input", "BYTES", (1,)), TritonTensor("max_tokens", "INT32", (1,), True))
        outputs = (TritonTensor("text_output", "BYTES", (-1,)),)
        defaults: dict[str, Any] = {"inputs": inputs, "outputs": outputs, "platform": "python"}
        return cls(name, generative=True, **{**defaults, **fields})

    def input(self, name: str) -> TritonTensor | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TritonTensor | None:
        return next((t for t in self.outputs if t.name == name), None)

    def shape(self, tensor: TritonTensor) -> list[int]:
        """The metadata shape: the config dims, behind -1 for the batch when batching."""
        return [-1, *tensor.dims] if self.max_batch_size > 0 else list(tensor.dims)

    @property
    def latest(self) -> str:
        return max(self.versions, key=int)


@dataclass(kw_only=True)
class TritonConfig(ServiceModel):
    """How the emulated Triton server behaves: the shared service model (`time_per_request_s`,
    `output_tokens_range`, `seed`, `fail_status` answered as `{"error": ...}`, `startup_delay_s`
    like Triton loading its models; `unhealthy` makes `/v2/health/live` and `/v2/health/ready`
    answer 400 with an empty body) plus Triton's own fields. Every field is validated on creation;
    change fields at runtime with `TritonEmulator.reconfigure` (validated, and applies capacity
    changes)."""

    models: tuple[TritonModel, ...] = (TritonModel("simple"), TritonModel.text_generator("llm"))
    server_version: str = "2.60.0"
    """What `GET /v2` reports as `version`."""
    strict_readiness: bool = True
    """`--strict-readiness`: `/v2/health/ready` needs every model ready (doc/protocols.md §2.1)."""
    time_per_request_s: float = 0.001
    """Execution time of one request (prefill, for a generative model), after it leaves the queue."""
    time_per_token_s: float = 0.002
    """Per generated token of a generative model (one `generate_stream` event per token)."""
    default_max_tokens: int = 16
    """Token limit when a generate request sends no `max_tokens`."""
    output_tokens_range: tuple[int, int] = (8, 32)
    """The "natural" answer length is drawn per prompt from this inclusive range."""
    # Fault knobs.
    not_ready: bool = False
    """`/v2/health/ready` answers 400 while live stays 200."""
    unready_models: tuple[str, ...] = ()
    """Models that are loaded but not ready (like after `/v2/repository/models/{m}/unload`)."""
    stream_error_after_tokens: int | None = None
    """`generate_stream` sends `data: {"error": ...}` after this many tokens and ends (§2.3)."""

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        self.unready_models = tuple(self.unready_models)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        names = [model.name for model in self.models]
        check(bool(names) and len(set(names)) == len(names), "models must be non-empty with unique names")
        self.at_least(1, "default_max_tokens")
        self.at_least(0, "stream_error_after_tokens")

    def decode_s(self) -> float:
        return self.time_per_token_s


# ---------------------------------------------------------------------------------------------
# Errors and tensors
# ---------------------------------------------------------------------------------------------


class _TritonError(EmulatedError):
    """An error answered with Triton's body `{"error": message}` (doc/protocols.md §2.4); `reason`
    labels `nv_inference_request_failure`."""

    def __init__(self, status: int, message: str, reason: str = "OTHER") -> None:
        super().__init__(status, message)
        self.reason = reason


def _bad(message: str) -> _TritonError:
    # INVALID_ARG → 400 since Triton 2.42 (doc/protocols.md §2.4).
    return _TritonError(400, message)


@dataclass
class _Tensor:
    name: str
    datatype: str
    shape: list[int]
    values: list[Any]
    """Flat, row-major: ints, floats, bools, or bytes for BYTES."""


def _unpack(datatype: str, raw: bytes) -> list[Any]:
    """Decode one binary tensor: little-endian values, or 4-byte-length-prefixed BYTES elements."""
    if datatype == "BYTES":
        values, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise _bad("unexpected end of BYTES tensor data")
            (length,) = struct.unpack_from("<I", raw, offset)
            values.append(raw[offset + 4 : offset + 4 + length])
            offset += 4 + length
        return values
    size = struct.calcsize(_FORMATS[datatype])
    if len(raw) % size:
        raise _bad(f"binary data size {len(raw)} is not a multiple of {datatype}'s size {size}")
    return list(struct.unpack(f"<{len(raw) // size}{_FORMATS[datatype]}", raw))


def _pack(datatype: str, values: list[Any]) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(value)) + value for value in values)
    return struct.pack(f"<{len(values)}{_FORMATS[datatype]}", *values)


def _flatten(data: Any) -> list[Any]:
    # KServe v2 allows the JSON `data` flat or nested row-major.
    if isinstance(data, list):
        return [item for element in data for item in _flatten(element)]
    return [data]


def _from_json(datatype: str, data: Any) -> list[Any]:
    values = _flatten(data)
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise _bad("BYTES tensor data must be strings in JSON")
        return [v.encode() for v in values]
    if datatype == "BOOL":
        ok = all(isinstance(v, bool) for v in values)
    elif datatype.startswith("FP"):
        ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    else:
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    if not ok:
        raise _bad(f"unable to parse 'data': expected {datatype} values")
    return values


def _to_json(datatype: str, values: list[Any]) -> list[Any]:
    return [v.decode("utf-8", "replace") for v in values] if datatype == "BYTES" else values


def _add_one(datatype: str, values: list[Any]) -> list[Any]:
    """The emulated compute: +1, wrapping integers like their C types; BOOL and BYTES echo."""
    if datatype in ("BOOL", "BYTES"):
        return list(values)
    if datatype.startswith("FP"):
        return [float(v) + 1.0 for v in values]
    bits = 8 * struct.calcsize(_FORMATS[datatype])
    low = -(2 ** (bits - 1)) if datatype.startswith("INT") else 0
    return [(v + 1 - low) % 2**bits + low for v in values]


# ---------------------------------------------------------------------------------------------
# Metrics (doc/protocols.md §2.5)
# ---------------------------------------------------------------------------------------------


# (name, help) of the counters, in Triton's order; the help texts follow TC `src/metrics.cc`.
_COUNTERS = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes"),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes"),
    ("nv_inference_count", "Number of inferences performed (does not include cached requests)"),
    ("nv_inference_exec_count", "Number of model executions performed (does not include cached requests)"),
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds"),
    (
        "nv_inference_queue_duration_us",
        "Cumulative inference queuing duration in microseconds (includes cached requests)",
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Cumulative compute inference duration in microseconds (does not include cached requests)",
    ),
)


class _VersionMetrics:
    """Triton's counters of one model version; durations in microseconds, as Triton counts them."""

    def __init__(self, families: dict[str, Family[Value]], model: str, version: str) -> None:
        labels = {"model": model, "version": version}

        def counter(name: str) -> Value:
            return families[f"nv_inference_{name}"].labels(**labels)

        self.success = counter("request_success")
        failure = families["nv_inference_request_failure"]
        self.failure = {reason: failure.labels(**labels, reason=reason) for reason in _FAILURE_REASONS}
        self.inference_count = counter("count")
        self.exec_count = counter("exec_count")
        self.request_duration_us = counter("request_duration_us")
        self.queue_duration_us = counter("queue_duration_us")
        self.compute_infer_duration_us = counter("compute_infer_duration_us")


# ---------------------------------------------------------------------------------------------
# The emulator
# ---------------------------------------------------------------------------------------------


@dataclass
class _Run(Job):
    """One inference request of a model version (`queue` is `(model name, version)`)."""

    model: TritonModel
    version: str
    request_id: Any
    batch: int = 1
    """Inferences in the request (`nv_inference_count`)."""
    words: list[str] = dataclasses.field(default_factory=list)
    """A generative model's answer, one decode step per word."""
    stream: bool = False

    def __post_init__(self) -> None:
        self.queue = self.key
        self.steps = len(self.words)

    @property
    def key(self) -> tuple[str, str]:
        return (self.model.name, self.version)


class TritonEmulator(Engine[TritonConfig, _Run]):
    """State and handlers of one emulated Triton server; reachable as `app.state.emulator`
    (`config`, `stats`, `reconfigure` from the shared engine)."""

    error = _TritonError

    def __init__(self, config: TritonConfig) -> None:
        super().__init__(config)
        self._metrics = Metrics()
        self._counters = {
            name: self._metrics.counter(
                name, help_text, "model", "version", *(("reason",) if name.endswith("failure") else ())
            )
            for name, help_text in _COUNTERS
        }
        self._pending = self._metrics.gauge(
            "nv_inference_pending_request_count",
            "Instantaneous number of pending requests awaiting execution per-model.",
            "model",
            "version",
        )
        self._versions: dict[tuple[str, str], _VersionMetrics] = {}
        self._reconfigured()

    def _reconfigured(self) -> None:
        """Give every model version of the config its queue and its counters."""
        for model in self.config.models:
            for version in model.versions:
                key = (model.name, version)
                if key not in self._queues:
                    self._queues[key] = self._scheduler_for(model.name)
                    self._versions[key] = _VersionMetrics(self._counters, model.name, version)
                    self._pending.labels(model=model.name, version=version)

    def _scheduler_for(self, name: str) -> Scheduler:
        # Read the model's limits on every decision, so `reconfigure` changes them live.
        return Scheduler(
            lambda: self._model_named(name).max_concurrency,
            lambda: self._model_named(name).max_queue_size or None,
        )

    def render_metrics(self) -> str:
        """Triton's metrics text (what the metrics app serves)."""
        for model, version in self._versions:
            self._pending.labels(model=model, version=version).set(self._queues[model, version].waiting)
        return self._metrics.render()

    # -- server endpoints (doc/protocols.md §2.1) --------------------------------------------------

    async def server_metadata(self, request: Request) -> Response:
        extensions = [
            "classification",
            "sequence",
            "model_repository",
            "schedule_policy",
            "binary_tensor_data",
        ]
        body = {"name": "triton", "version": self.config.server_version, "extensions": extensions}
        return JSONResponse(body)

    async def live(self, request: Request) -> Response:
        return Response(status_code=400 if self.config.unhealthy else 200)

    async def ready(self, request: Request) -> Response:
        config = self.config
        all_ready = not config.unready_models or not config.strict_readiness
        ok = not config.unhealthy and not config.not_ready and all_ready
        return Response(status_code=200 if ok else 400)

    # -- model endpoints (doc/protocols.md §2.1, §2.2) ---------------------------------------------

    async def model_metadata(self, request: Request) -> Response:
        model, version = self._resolve(request, need_ready=False)
        versions = [version] if "version" in request.path_params else list(model.versions)

        def describe(tensor: TritonTensor) -> dict[str, Any]:
            return {"name": tensor.name, "datatype": tensor.datatype, "shape": model.shape(tensor)}

        body = {
            "name": model.name,
            "versions": versions,
            "platform": model.platform,
            "inputs": [describe(t) for t in model.inputs],
            "outputs": [describe(t) for t in model.outputs],
        }
        return JSONResponse(body)

    async def model_ready(self, request: Request) -> Response:
        model, _ = self._resolve(request, need_ready=False)
        if model.name in self.config.unready_models:
            return JSONResponse({"error": "Model version not ready"}, status_code=400)
        return Response(status_code=200)

    async def model_config(self, request: Request) -> Response:
        model, _ = self._resolve(request, need_ready=False)
        return JSONResponse(_config_json(model))

    async def repository_index(self, request: Request) -> Response:
        raw = await request.body()
        body = _json_object(raw) if raw.strip() else {}
        ready_only = body.get("ready", False)
        if not isinstance(ready_only, bool):
            raise _bad("Unable to parse 'ready', expected bool")
        entries = []
        for model in self.config.models:
            ready = model.name not in self.config.unready_models
            if ready_only and not ready:
                continue
            for version in model.versions:
                entry = {"name": model.name, "version": version, "state": "READY" if ready else "UNAVAILABLE"}
                entries.append(entry if ready else {**entry, "reason": "unloaded"})
        return JSONResponse(entries)

    async def repository_load(self, request: Request) -> Response:
        """`/v2/repository/models/{m}/load|unload` flip the model's readiness."""
        name, action = request.path_params["model"], request.path_params["action"]
        if action not in ("load", "unload"):
            raise HTTPException(404)
        self._model_named(name)
        unready = set(self.config.unready_models) - {name}
        if action == "unload":
            unready.add(name)
        self.reconfigure(unready_models=tuple(sorted(unready)))
        return Response(status_code=200)

    # -- inference (doc/protocols.md §2.3) ---------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        return await self._answer(request, self._infer)

    async def generate(self, request: Request) -> Response:
        return await self._answer(request, self._generate)

    async def generate_stream(self, request: Request) -> Response:
        return await self._answer(request, self._generate_stream)

    async def _answer(
        self, request: Request, handler: Callable[[Request, TritonModel, str], Awaitable[Response]]
    ) -> Response:
        """The engine's front door, once the path names a ready model version."""
        model, version = self._resolve(request, need_ready=True)

        def render(error: EmulatedError) -> Response:
            self._count_failure((model.name, version), error)
            return _error_response(error)

        request_id = request.headers.get("x-request-id")
        return await self._serve(lambda: handler(request, model, version), render, request_id)

    def _count_failure(self, key: tuple[str, str], error: EmulatedError) -> None:
        reason = error.reason if isinstance(error, _TritonError) else "OTHER"
        self._versions[key].failure[reason].inc()

    async def _infer(self, request: Request, model: TritonModel, version: str) -> Response:
        body, binary = _split_body(await request.body(), request.headers)
        inputs = _decode_inputs(model, body, binary)
        wanted = _wanted_outputs(model, body)
        batch = inputs[0].shape[0] if model.max_batch_size > 0 and inputs[0].shape else 1
        words = self._prompt_words(inputs) if model.generative else []
        run = _Run(model=model, version=version, request_id=body.get("id"), batch=batch, words=words)
        self._check_room(run)
        await self._run(run)
        if model.generative:
            outputs = {"text_output": _Tensor("text_output", "BYTES", [1], [_text_of(words).encode()])}
        else:
            outputs = {
                out.name: _Tensor(out.name, out.datatype, inp.shape, _add_one(inp.datatype, inp.values))
                for out, inp in zip(model.outputs, _paired(model, inputs), strict=True)
            }
        return _infer_response(model, version, run.request_id, outputs, wanted)

    def _prompt_words(self, inputs: list[_Tensor]) -> list[str]:
        """A generative model's answer to its `text_input` and optional `max_tokens` tensors."""
        by_name = {tensor.name: tensor for tensor in inputs}
        prompt = (
            by_name["text_input"].values[0].decode("utf-8", "replace") if by_name["text_input"].values else ""
        )
        max_tokens = by_name["max_tokens"].values[0] if "max_tokens" in by_name else None
        return self._words(prompt, max_tokens)

    def _words(self, prompt: str, max_tokens: Any) -> list[str]:
        limit = self.config.default_max_tokens if max_tokens is None else max_tokens
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise _bad("max_tokens must be a positive integer")
        return self.config.answer(prompt, limit)

    # -- generate extension ------------------------------------------------------------------------

    def _generate_run(self, body: dict[str, Any], model: TritonModel, version: str, stream: bool) -> _Run:
        # Top-level keys map to inputs by name, then to `parameters` (doc/protocols.md §2.3).
        if not model.generative:
            # Mapping arbitrary keys onto tensor models is not emulated; say so instead of guessing.
            raise _bad(f"generate is only emulated for generative models, not for '{model.name}'")
        text = body.get("text_input")
        if not isinstance(text, str):
            raise _bad("expected 'text_input' to be a string")
        parameters = body.get("parameters")
        parameters = parameters if isinstance(parameters, dict) else {}
        words = self._words(text, body.get("max_tokens", parameters.get("max_tokens")))
        return _Run(model=model, version=version, request_id=body.get("id"), words=words, stream=stream)

    async def _generate(self, request: Request, model: TritonModel, version: str) -> Response:
        run = self._generate_run(_json_object(await request.body()), model, version, stream=False)
        self._check_room(run)
        await self._run(run)
        return JSONResponse(_generate_body(model, version, run.request_id, _text_of(run.words)))

    async def _generate_stream(self, request: Request, model: TritonModel, version: str) -> Response:
        run = self._generate_run(_json_object(await request.body()), model, version, stream=True)
        # Errors before inference starts are plain JSON with a status (§2.3): check the queue now.
        self._check_room(run)
        return StreamingResponse(self._stream_events(run), media_type="text/event-stream; charset=utf-8")

    async def _stream_events(self, run: _Run) -> AsyncGenerator[str, None]:
        """`data: {json}\\n\\n` per token, no `[DONE]`; a later error is an event (§2.3)."""
        try:
            self._check_room(run)  # Again: the queue may have filled since the headers went out.
            async with contextlib.aclosing(self._steps(run)) as steps:
                async for step in steps:
                    text = run.words[step] if step == 0 else f" {run.words[step]}"
                    yield sse(_generate_body(run.model, run.version, run.request_id, text))
        except _TritonError as error:
            self._failed(error)
            self._count_failure(run.key, error)
            yield sse({"error": error.message})

    # -- the engine's hooks: Triton's counters, queue bound and mid-stream fault -------------------

    def _queue_full(self, run: _Run) -> EmulatedError:
        # doc/protocols.md §2.4: the dynamic batcher's wording, with the request id or a placeholder.
        shown = run.request_id if run.request_id else _UNKNOWN_ID
        return _TritonError(503, f"[request id: {shown}] Exceeds maximum queue size", "REJECTED")

    def _admitted(self, run: _Run) -> None:
        self._versions[run.key].queue_duration_us.inc(_us(run.queued_s))

    def _cut(self, run: _Run, tokens_done: int) -> None:
        after = self.config.stream_error_after_tokens
        if run.stream and tokens_done == after and tokens_done < run.steps:
            raise _TritonError(500, "Emulated failure mid-stream (stream_error_after_tokens).")

    def _finished(self, run: _Run, outcome: Outcome) -> None:
        metrics = self._versions[run.key]
        now = time.monotonic()
        if outcome == "completed":
            metrics.success.inc()
            metrics.inference_count.inc(run.batch)
            metrics.exec_count.inc()
        elif outcome == "aborted":
            metrics.failure["CANCELED"].inc()
        if run.started is not None:
            metrics.compute_infer_duration_us.inc(_us(now - run.started))
        metrics.request_duration_us.inc(_us(now - run.arrival))

    # -- lookup ------------------------------------------------------------------------------------

    def _model_named(self, name: str) -> TritonModel:
        for model in self.config.models:
            if model.name == name:
                return model
        raise _TritonError(404, f"Request for unknown model: '{name}' is not found")

    def _resolve(self, request: Request, need_ready: bool) -> tuple[TritonModel, str]:
        """The model and version of the path; 404/503 per TC `model_lifecycle.cc` (§2.1, §2.4)."""
        model = self._model_named(request.path_params["model"])
        version = request.path_params.get("version")
        if version is not None and version not in model.versions:
            raise _TritonError(
                404, f"Request for unknown model: '{model.name}' version {version} is not found"
            )
        if need_ready and model.name in self.config.unready_models:
            if version is None:
                raise _TritonError(
                    404, f"Request for unknown model: '{model.name}' has no available versions"
                )
            message = f"Request for unknown model: '{model.name}' version {version} is not at ready state"
            raise _TritonError(503, message)
        return model, version or model.latest


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


def _text_of(words: list[str]) -> str:
    return " ".join(words)


def _generate_body(model: TritonModel, version: str, request_id: Any, text: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model_name": model.name, "model_version": version, "text_output": text}
    return {"id": request_id, **body} if request_id is not None else body


def _config_json(model: TritonModel) -> dict[str, Any]:
    """The model config as `GET …/config` renders it (a subset of Triton's ModelConfig JSON)."""

    def tensor(t: TritonTensor) -> dict[str, Any]:
        out: dict[str, Any] = {"name": t.name, "data_type": f"TYPE_{t.datatype}", "dims": list(t.dims)}
        return {**out, "optional": True} if t.optional else out

    config: dict[str, Any] = {
        "name": model.name,
        "platform": model.platform,
        "max_batch_size": model.max_batch_size,
        "input": [tensor(t) for t in model.inputs],
        "output": [tensor(t) for t in model.outputs],
        "instance_group": [{"name": model.name, "count": model.max_concurrency, "kind": "KIND_CPU"}],
        "version_policy": {"specific": {"versions": [int(v) for v in model.versions]}},
    }
    if model.max_queue_size:
        config["dynamic_batching"] = {"default_queue_policy": {"max_queue_size": model.max_queue_size}}
    return config


# ---------------------------------------------------------------------------------------------
# Request and response bodies (doc/protocols.md §2.3, binary tensor extension)
# ---------------------------------------------------------------------------------------------


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:  # too deep: unparsable
        raise _bad(f"failed to parse the request JSON buffer: {error}") from None
    if not isinstance(body, dict):
        raise _bad("expected a JSON object in the request body")
    return body


def _split_body(raw: bytes, headers: Any) -> tuple[dict[str, Any], bytes]:
    """Split JSON header and binary tensor data at `Inference-Header-Content-Length`."""
    length = headers.get("inference-header-content-length")
    if length is None:
        return _json_object(raw), b""
    if not length.isdigit() or int(length) > len(raw):
        raise _bad(f"invalid Inference-Header-Content-Length {length!r}")
    return _json_object(raw[: int(length)]), raw[int(length) :]


def _decode_inputs(model: TritonModel, body: dict[str, Any], binary: bytes) -> list[_Tensor]:
    entries = body.get("inputs")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise _bad("expected 'inputs' to be an array of objects")
    tensors, offset = [], 0
    for entry in entries:
        tensor, used = _decode_input(model, entry, binary[offset:])
        tensors.append(tensor)
        offset += used
    if offset != len(binary):
        raise _bad(f"unexpected additional input data for model '{model.name}'")
    given = {t.name for t in tensors}
    missing = [t.name for t in model.inputs if not t.optional and t.name not in given]
    if missing:
        raise _bad(
            f"[request id: {body.get('id') or _UNKNOWN_ID}] expected {len(model.inputs)} inputs but got "
            f"{len(tensors)} inputs for model '{model.name}'. Missing required input(s) {missing}"
        )
    return tensors


def _decode_input(model: TritonModel, entry: dict[str, Any], binary: bytes) -> tuple[_Tensor, int]:
    """One input tensor, and how many bytes of the binary section it took."""
    name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
    spec = model.input(name) if isinstance(name, str) else None
    if spec is None or not isinstance(name, str):
        raise _bad(f"unexpected inference input '{name}' for model '{model.name}'")
    if datatype != spec.datatype:
        raise _bad(
            f"inference input '{name}' data-type is '{datatype}', but model '{model.name}' "
            f"expects '{spec.datatype}'"
        )
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _bad(f"unable to parse 'shape' of input '{name}'")
    _check_shape(model, spec, shape)
    parameters = entry.get("parameters") or {}
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise _bad(f"unexpected binary_data_size for input '{name}'")
        values, used = _unpack(datatype, binary[:size]), size
    elif "data" in entry:
        values, used = _from_json(datatype, entry["data"]), 0
    else:
        raise _bad(f"expected 'data' or 'binary_data_size' for input '{name}'")
    if len(values) != math.prod(shape):
        raise _bad(f"unexpected number of elements {len(values)} for input '{name}', shape {shape}")
    return _Tensor(name, datatype, shape, values), used


def _check_shape(model: TritonModel, spec: TritonTensor, shape: list[int]) -> None:
    expected = model.shape(spec)
    fits = len(shape) == len(expected) and all(e in (-1, d) for e, d in zip(expected, shape, strict=True))
    if fits and model.max_batch_size > 0:
        fits = 1 <= shape[0] <= model.max_batch_size
    if not fits:
        raise _bad(
            f"[request id: {_UNKNOWN_ID}] unexpected shape for input '{spec.name}' for model "
            f"'{model.name}'. Expected {json.dumps(expected)}, got {json.dumps(shape)}. "
        )


def _paired(model: TritonModel, inputs: list[_Tensor]) -> list[_Tensor]:
    by_name = {tensor.name: tensor for tensor in inputs}
    paired = []
    for spec in model.inputs[: len(model.outputs)]:
        if spec.name not in by_name:  # An optional input left out: its output is empty.
            by_name[spec.name] = _Tensor(spec.name, spec.datatype, [0], [])
        paired.append(by_name[spec.name])
    return paired


def _wanted_outputs(model: TritonModel, body: dict[str, Any]) -> list[tuple[str, bool]]:
    """(output name, binary?) pairs. Per-output `binary_data` wins over `binary_data_output`."""
    parameters = body.get("parameters") or {}
    default_binary = bool(parameters.get("binary_data_output", False))
    requested = body.get("outputs")
    if requested is None:
        return [(out.name, default_binary) for out in model.outputs]
    if not isinstance(requested, list) or not all(isinstance(r, dict) for r in requested):
        raise _bad("expected 'outputs' to be an array of objects")
    wanted = []
    for entry in requested:
        if model.output(str(entry.get("name"))) is None:
            raise _bad(f"unexpected inference output '{entry.get('name')}' for model '{model.name}'")
        binary = (entry.get("parameters") or {}).get("binary_data", default_binary)
        wanted.append((str(entry["name"]), bool(binary)))
    return wanted


def _infer_response(
    model: TritonModel,
    version: str,
    request_id: Any,
    outputs: dict[str, _Tensor],
    wanted: list[tuple[str, bool]],
) -> Response:
    entries, chunks = [], []
    for name, binary in wanted:
        tensor = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary:
            raw = _pack(tensor.datatype, tensor.values)
            chunks.append(raw)
            entry["parameters"] = {"binary_data_size": len(raw)}
        else:
            entry["data"] = _to_json(tensor.datatype, tensor.values)
        entries.append(entry)
    body: dict[str, Any] = {"model_name": model.name, "model_version": version, "outputs": entries}
    if request_id is not None:  # Echoed only when sent (doc/protocols.md §2.3).
        body = {"id": request_id, **body}
    header = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    # Binary extension: JSON, then the raw outputs in order; the header gives the JSON length.
    response = Response(header + b"".join(chunks), media_type="application/octet-stream")
    response.headers["Inference-Header-Content-Length"] = str(len(header))
    return response


# ---------------------------------------------------------------------------------------------
# The apps
# ---------------------------------------------------------------------------------------------


def _error_response(error: EmulatedError) -> Response:
    return JSONResponse({"error": error.message}, status_code=error.status)


async def _triton_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, _TritonError)
    return _error_response(error)


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    if error.status_code == 404:  # An unmatched path (doc/protocols.md §2).
        return JSONResponse({"error": "Not Found"}, status_code=404)
    return Response(status_code=error.status_code, headers=error.headers)  # 405: empty body.


def _model_routes(emulator: TritonEmulator) -> list[Route]:
    """Every model path, with and without `/versions/{v}` (doc/protocols.md §2)."""
    endpoints: list[tuple[str, Callable[[Request], Awaitable[Response]], str]] = [
        ("", emulator.model_metadata, "GET"),
        ("/ready", emulator.model_ready, "GET"),
        ("/config", emulator.model_config, "GET"),
        ("/infer", emulator.infer, "POST"),
        ("/generate", emulator.generate, "POST"),
        ("/generate_stream", emulator.generate_stream, "POST"),
    ]
    routes = []
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [Route(prefix + suffix, handler, methods=[method]) for suffix, handler, method in endpoints]
    return routes


def create_triton_app(config: TritonConfig | None = None, **overrides: Any) -> Starlette:
    """Build an ASGI app that behaves like Triton's HTTP endpoint (port 8000).

    Args:
        config: the service model; defaults to `TritonConfig()`.
        **overrides: `TritonConfig` fields to change, e.g. `unhealthy=True`.

    Returns:
        A Starlette app; its `TritonEmulator` is `app.state.emulator`, and the matching metrics app
        (Triton's port 8002) is `app.state.metrics_app`.
    """
    emulator = TritonEmulator(dataclasses.replace(config or TritonConfig(), **overrides))
    routes = [
        Route("/v2", emulator.server_metadata, methods=["GET"]),
        Route("/v2/health/live", emulator.live, methods=["GET"]),
        Route("/v2/health/ready", emulator.ready, methods=["GET"]),
        *_model_routes(emulator),
        Route("/v2/repository/index", emulator.repository_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/{action:str}", emulator.repository_load, methods=["POST"]),
        *control_routes(emulator),
    ]
    handlers = {_TritonError: _triton_error, HTTPException: _http_error}
    app = Starlette(routes=routes, exception_handlers=handlers, middleware=[Middleware(AbortOnDisconnect)])
    app.state.emulator = emulator
    app.state.metrics_app = create_triton_metrics_app(emulator)
    return app


def create_triton_metrics_app(emulator: TritonEmulator | Starlette) -> Starlette:
    """Build Triton's metrics endpoint (`GET /metrics`, port 8002 in Triton) for an emulator.

    Serve it beside the main app: `serve_in_thread(app.state.metrics_app)`. It shares the main
    app's `startup_delay_s`, as Triton opens all its ports together.
    """
    if isinstance(emulator, Starlette):
        emulator = emulator.state.emulator
    assert isinstance(emulator, TritonEmulator)
    bound = emulator

    async def metrics(request: Request) -> Response:
        return Response(bound.render_metrics(), media_type=PROMETHEUS_TEXT)

    app = Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])
    app.state.emulator = emulator
    return app
