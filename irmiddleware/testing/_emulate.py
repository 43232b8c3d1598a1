"""`irmiddleware emulate vllm|triton|tgi`: one emulated inference server in the foreground, on a
port you choose, so a router configuration (examples/router.toml) can be tried without GPUs and
without writing Python. Ctrl-C or SIGTERM stops it gracefully (answers in flight finish first)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from typing import Any, Final

from irmiddleware.testing._server import RunningServer, serve_in_thread
from irmiddleware.testing._tgi import create_tgi_app
from irmiddleware.testing._triton import TritonModel, create_triton_app, create_triton_metrics_app
from irmiddleware.testing._vllm import create_vllm_app

__all__ = ["emulate_main"]

# Each server's own default port (doc/protocols.md §0), so the emulator answers where clients look.
_DEFAULT_PORTS: Final = {"vllm": 8000, "triton": 8000, "tgi": 3000}
_TRITON_METRICS_PORT: Final = 8002


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irmiddleware emulate",
        description="Serve one emulated vLLM, Triton or TGI server on 127.0.0.1 until Ctrl-C.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("kind", choices=sorted(_DEFAULT_PORTS), help="the protocol to speak")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, help="port to bind (default: the server's own: 8000, TGI 3000)")
    parser.add_argument(
        "--model",
        action="append",
        help="a served model name (repeat for more; TGI serves exactly one; Triton: text generators)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        help="requests executed at once (vLLM max_num_seqs, TGI max_batch_size, Triton per model)",
    )
    parser.add_argument(
        "--time-per-output-token", type=float, metavar="SECONDS", help="decode time per generated token"
    )
    parser.add_argument("--seed", type=int, help="seed of the generated text and lengths")
    parser.add_argument(
        "--metrics-port", type=int, default=_TRITON_METRICS_PORT, help="Triton only: its metrics port"
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The options given, as fields of the kind's config (only those given: the rest keep the
    emulator's defaults)."""
    models: list[str] = args.model or []
    overrides: dict[str, Any] = {} if args.seed is None else {"seed": args.seed}
    token_field = "time_per_token_s" if args.kind == "triton" else "time_per_output_token_s"
    if args.time_per_output_token is not None:
        overrides[token_field] = args.time_per_output_token
    if args.kind == "vllm":
        if models:
            overrides["served_model_names"] = tuple(models)
        if args.concurrency is not None:
            overrides["max_num_seqs"] = args.concurrency
    elif args.kind == "tgi":
        if len(models) > 1:
            raise ValueError("TGI serves one model per server: give --model once")
        if models:
            overrides["model_id"] = models[0]
        if args.concurrency is not None:
            overrides["max_batch_size"] = args.concurrency
    elif models or args.concurrency is not None:
        concurrency = {} if args.concurrency is None else {"max_concurrency": args.concurrency}
        names = models or ["llm"]
        overrides["models"] = tuple(TritonModel.text_generator(name, **concurrency) for name in names)
    return overrides


_FACTORIES: Final[dict[str, Callable[..., Any]]] = {
    "vllm": create_vllm_app,
    "triton": create_triton_app,
    "tgi": create_tgi_app,
}


def _serve(args: argparse.Namespace, app: Any, stack: ExitStack) -> Iterator[tuple[str, RunningServer]]:
    port = _DEFAULT_PORTS[args.kind] if args.port is None else args.port
    yield "api", stack.enter_context(serve_in_thread(app, args.host, port))
    if args.kind == "triton":
        metrics = create_triton_metrics_app(app)
        yield "metrics", stack.enter_context(serve_in_thread(metrics, args.host, args.metrics_port))


def emulate_main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        app = _FACTORIES[args.kind](**_overrides(args))
    except (TypeError, ValueError) as error:
        print(f"irmiddleware emulate: {error}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    with ExitStack() as stack:
        try:
            servers = list(_serve(args, app, stack))
        except OSError as error:  # the port is taken, or the address is not ours
            print(f"irmiddleware emulate: {error}", file=sys.stderr)
            return 1
        config = app.state.emulator.config
        served = getattr(config, "served_model_names", None) or getattr(config, "model_id", None)
        if served is None:
            served = tuple(model.name for model in config.models)
        names = ", ".join(served) if isinstance(served, tuple) else served
        where = ", ".join(f"{label} {server.url}" for label, server in servers)
        print(f"emulated {args.kind} serving {names}: {where} (Ctrl-C stops)", flush=True)
        stop.wait()
    return 0
