"""The `irmiddleware` command: one subcommand per job, each implemented next to what it runs and
imported only when chosen (so `irmiddleware bench` never imports the proxy's dependencies)."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Final

# subcommand -> (module, function, one-line help). Each function takes argv and returns an exit code.
COMMANDS: Final = {
    "demo": (
        "irmiddleware._demo",
        "demo_main",
        "emulated fleet + router + real client traffic, per strategy",
    ),
    "emulate": (
        "irmiddleware.testing._emulate",
        "emulate_main",
        "serve one emulated vLLM, Triton or TGI server (for trying a router config)",
    ),
    "serve": ("irmiddleware.proxy._serve", "serve_main", "run the routing proxy (--config router.toml)"),
    "admin": (
        "irmiddleware.proxy._admin_cli",
        "admin_main",
        "list, add, drain, remove backends of a running router (its admin listener)",
    ),
    "simulate": (
        "irmiddleware.sim._cli",
        "simulate_main",
        "compare strategies in a discrete-event simulation",
    ),
    "bench": ("irmiddleware.bench._core", "bench_main", "decisions/s of the native core (seed scale test)"),
    "bench-proxy": ("irmiddleware.bench._proxy", "bench_proxy_main", "proxy overhead against direct calls"),
    "bench-affinity": (
        "irmiddleware.bench._affinity",
        "bench_affinity_main",
        "cost of a cache-aware decision",
    ),
    "bench-predict": (
        "irmiddleware.bench._predict",
        "bench_predict_main",
        "least_ttft against prefix_affinity behind emulators of unequal speed",
    ),
    "bench-signals": (
        "irmiddleware.bench._signals",
        "bench_signals_main",
        "reading a backend's load from its Prometheus page",
    ),
    "bench-admission": (
        "irmiddleware.bench._admission",
        "bench_admission_main",
        "top-class p99 under overload, with and without priority classes",
    ),
    "bench-replicas": (
        "irmiddleware.bench._replicas",
        "bench_replicas_main",
        "balance across router replicas hit unevenly, per strategy",
    ),
}


def usage() -> str:
    lines = [
        "usage: irmiddleware COMMAND [options]   (irmiddleware COMMAND --help for options;"
        " irmiddleware --version)",
        "",
    ]
    lines += [f"  {name:<12} {help_text}" for name, (_module, _function, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _run(list(sys.argv[1:] if argv is None else argv))
        finally:
            sys.stdout.flush()  # here, not at exit: a reader that left is noticed inside the try
    except BrokenPipeError:
        # The reader left early (`irmiddleware --help | head -1`): nothing more to say, and
        # nobody to say it to. Python's own flush at exit must not find the broken pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        from irmiddleware import __version__  # late: the CLI imports nothing it does not run

        print(f"irmiddleware {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"irmiddleware: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _help = COMMANDS[command]
    function: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), function_name)
    return function(rest)


if __name__ == "__main__":
    sys.exit(main())
