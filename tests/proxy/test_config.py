"""The TOML configuration: the documented shape parses into typed defaults, the shipped example config
loads, and every invalid value fails at startup with an error naming its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from irmiddleware.proxy import ConfigError, RouterConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def test_minimal_config_gets_defaults() -> None:
    config = parse_config({"backends": [{"url": "http://127.0.0.1:9001/"}]})
    assert config.strategy == "p2c"
    assert config.listen_host_port == ("127.0.0.1", 8000)
    backend = config.backends[0]
    assert (backend.url, backend.type, backend.capacity, backend.models) == (
        "http://127.0.0.1:9001",
        "vllm",
        64,
        (),
    )
    assert config.timeouts.read_s > 60  # LLM answers take long; httpx's 5 s default would cut them


def test_design_md_shape_and_example_file_load(tmp_path: Path) -> None:
    path = tmp_path / "router.toml"
    path.write_text(
        '[router]\nstrategy = "round_robin"\nlisten = "127.0.0.1:8100"\n'
        "[router.timeouts]\nconnect_s = 1\n[router.retries]\nconnect_attempts = 0\n"
        '[[backends]]\nurl = "http://127.0.0.1:9001"\ntype = "vllm"\ncapacity = 4\nmodels = ["llama-3-8b"]\n'
    )
    config = load_config(path)
    assert isinstance(config, RouterConfig)
    assert config.strategy == "round_robin" and config.timeouts.connect_s == 1.0
    assert config.retries.connect_attempts == 0 and config.backends[0].models == ("llama-3-8b",)
    example = load_config(ROOT / "examples" / "router.toml")
    assert len(example.backends) == 2


@pytest.mark.parametrize(
    ("document", "key"),
    [
        ({}, "backends"),
        ({"backends": []}, "backends"),
        ({"backends": [{"type": "vllm"}]}, "backends[0].url"),
        ({"backends": [{"url": "ftp://x"}]}, "backends[0].url"),
        ({"backends": [{"url": "http://a", "capacity": 0}]}, "backends[0].capacity"),
        ({"backends": [{"url": "http://a", "capacity": True}]}, "backends[0].capacity"),
        ({"backends": [{"url": "http://a", "models": "m"}]}, "backends[0].models"),
        ({"backends": [{"url": "http://a", "colour": "red"}]}, "backends[0].colour"),
        ({"backends": [{"url": "http://a"}, {"url": "http://a/"}]}, "backends[1].url"),
        ({"router": {"listen": "8000"}, "backends": [{"url": "http://a"}]}, "router.listen"),
        ({"router": {"strategy": 3}, "backends": [{"url": "http://a"}]}, "router.strategy"),
        (
            {"router": {"timeouts": {"read_s": -1}}, "backends": [{"url": "http://a"}]},
            "router.timeouts.read_s",
        ),
        (
            {"router": {"limits": {"max_body": 1}}, "backends": [{"url": "http://a"}]},
            "router.limits.max_body",
        ),
        (
            {"router": {"retries": {"connect_attempts": -1}}, "backends": [{"url": "http://a"}]},
            "router.retries",
        ),
        ({"router": {"metrics_path": "metrics"}, "backends": [{"url": "http://a"}]}, "router.metrics_path"),
        ({"router": {"shutdown_grace_s": -1}, "backends": [{"url": "http://a"}]}, "router.shutdown_grace_s"),
        ({"router": {"shutdown_grace_s": 1.5}, "backends": [{"url": "http://a"}]}, "router.shutdown_grace_s"),
    ],
)
def test_invalid_values_name_their_key(document: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_config(document)


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[router\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_config(tmp_path / "missing.toml")
