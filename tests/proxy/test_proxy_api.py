"""The public surface of the proxy and the plugin API is pinned (sorted `__all__`), and
`irmiddleware serve` builds its configuration from a file and/or flags, failing clearly without."""

from __future__ import annotations

from pathlib import Path

import pytest

import irmiddleware.hooks
import irmiddleware.proxy
from irmiddleware.proxy import ConfigError
from irmiddleware.proxy._serve import _parser, build_config, serve_main

ROOT = Path(__file__).resolve().parents[2]


def test_public_names_are_pinned_and_sorted() -> None:
    proxy = ["OUTCOMES", "BackendConfig", "ConfigError", "LimitsConfig", "RetriesConfig", "RouterConfig"]
    proxy += ["RoutingMiddleware", "TimeoutsConfig", "create_app", "load_config", "parse_config"]
    assert irmiddleware.proxy.__all__ == proxy
    hooks = irmiddleware.hooks.__all__
    assert hooks == sorted(hooks, key=lambda name: (not name.isupper(), name))
    assert {"hookimpl", "hookspec", "IrmHookspecs", "PythonStrategy", "BackendAdapter"} <= set(hooks)
    specs = [name for name in vars(irmiddleware.hooks.IrmHookspecs) if not name.startswith("_")]
    assert specs and all(name.startswith("irm_") for name in specs)


def test_serve_flags_and_file() -> None:
    args = _parser().parse_args(
        ["--backend", "http://127.0.0.1:9001", "--strategy", "round_robin", "--model", "m"]
    )
    config = build_config(args)
    assert config.strategy == "round_robin" and config.backends[0].models == ("m",)
    from_file = build_config(
        _parser().parse_args(["--config", str(ROOT / "examples/router.toml"), "--listen", "127.0.0.1:9"])
    )
    assert from_file.listen == "127.0.0.1:9" and len(from_file.backends) == 2
    with pytest.raises(ConfigError, match="--backend"):
        build_config(_parser().parse_args([]))
    assert serve_main(["--strategy", "p2c"]) == 2  # no backend: a clear message, exit code 2
    graceful = build_config(
        _parser().parse_args(["--backend", "http://127.0.0.1:9001", "--shutdown-grace", "30"])
    )
    assert graceful.shutdown_grace_s == 30 and config.shutdown_grace_s is None
    assert serve_main(["--backend", "http://127.0.0.1:9001", "--shutdown-grace", "-1"]) == 2
