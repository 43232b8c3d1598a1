"""The TOML configuration: the documented shape parses into typed defaults, the shipped example config
loads, and every invalid value fails at startup with an error naming its key: ports out of range,
NaN and infinities in any number, two spellings of one backend URL, credentials in a URL (never
repeated in the message), a model claimed by backends of two types. `irmiddleware serve` turns each
into one line on stderr and exit code 2. Backend URLs come out in one canonical spelling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from irmiddleware import STRATEGIES
from irmiddleware.proxy import ConfigError, RouterConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def test_minimal_config_gets_defaults() -> None:
    config = parse_config({"backends": [{"url": "http://127.0.0.1:9001/"}]})
    assert config.strategy == "p2c"
    assert config.limits.keepalive_expiry_s < 5  # below uvicorn's idle timeout, the backends' usual one
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


def test_the_example_config_names_every_strategy() -> None:
    lines = (ROOT / "examples" / "router.toml").read_text().splitlines()
    (first,) = [number for number, line in enumerate(lines) if line.startswith("strategy")]
    listed = " ".join(line.partition("#")[2] for line in lines[first : first + 2])  # a comment that goes on
    assert [name for name in STRATEGIES if name not in listed] == []


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


_BACKEND = {"url": "http://127.0.0.1:9001"}


def _with_router(router: dict[str, Any]) -> dict[str, Any]:
    return {"router": router, "backends": [_BACKEND]}


@pytest.mark.parametrize(
    ("url", "canonical"),
    [
        ("http://127.0.0.1:9001/", "http://127.0.0.1:9001"),
        ("HTTP://Host.Example:80/", "http://host.example"),
        ("https://host:443/v1/", "https://host/v1"),
        ("https://host:8443/Prefix", "https://host:8443/Prefix"),
        ("http://[::1]:9001", "http://[::1]:9001"),
    ],
)
def test_backend_urls_are_canonical(url: str, canonical: str) -> None:
    config = parse_config({"backends": [{"url": url, "metrics_url": url.rstrip("/") + "/metrics"}]})
    assert config.backends[0].url == canonical
    assert config.backends[0].metrics_url == canonical + "/metrics"


@pytest.mark.parametrize(
    ("document", "key", "message"),
    [
        ({"backends": [{"url": "http://127.0.0.1:99999"}]}, "backends[0].url", "port in 1..65535"),
        ({"backends": [{"url": "http://127.0.0.1:0"}]}, "backends[0].url", "port in 1..65535"),
        ({"backends": [{"url": "http://127.0.0.1:x1"}]}, "backends[0].url", "port in 1..65535"),
        (
            {"backends": [{"url": "http://a:9001", "metrics_url": "http://a:70000/metrics"}]},
            "backends[0].metrics_url",
            "port in 1..65535",
        ),
        ({"backends": [{"url": "http://a", "weight": float("inf")}]}, "backends[0].weight", "finite"),
        ({"backends": [{"url": "http://a", "weight": float("nan")}]}, "backends[0].weight", "finite"),
        ({"backends": [{"url": "http://a", "weight": 1e9}]}, "backends[0].weight", "<= 1000"),
        ({"backends": [{"url": "http://a", "capacity": 2**40}]}, "backends[0].capacity", "<= 2147483647"),
        (_with_router({"timeouts": {"read_s": float("nan")}}), "router.timeouts.read_s", "finite"),
        (_with_router({"timeouts": {"connect_s": float("inf")}}), "router.timeouts.connect_s", "finite"),
        (
            _with_router({"limits": {"keepalive_expiry_s": float("inf")}}),
            "router.limits.keepalive_expiry_s",
            "finite",
        ),
        (_with_router({"limits": {"keepalive_expiry_s": -1.0}}), "router.limits.keepalive_expiry_s", ">= 0"),
        (_with_router({"health": {"interval_s": float("inf")}}), "router.health.interval_s", "finite"),
        (
            _with_router({"outliers": {"min_eligible_share": float("nan")}}),
            "router.outliers.min_eligible_share",
            "finite",
        ),
        (
            _with_router({"affinity": {"balance_epsilon": float("-inf")}}),
            "router.affinity.balance_epsilon",
            "finite",
        ),
        (
            {"backends": [_BACKEND], "admission": {"max_wait_s": float("nan")}},
            "admission.max_wait_s",
            "finite",
        ),
        (
            {"backends": [_BACKEND], "admission": {"classes": {"2": {"max_wait_s": float("inf")}}}},
            "admission.classes.2.max_wait_s",
            "finite",
        ),
        (
            {"backends": [_BACKEND], "admission": {"tenant_defaults": {"rate_per_s": float("inf")}}},
            "admission.tenant_defaults.rate_per_s",
            "finite",
        ),
        (
            {"backends": [{"url": "HTTP://host"}, {"url": "http://host"}]},
            "backends[1].url",
            "the server of `backends[0].url`",
        ),
        (
            {"backends": [{"url": "http://host:80"}, {"url": "http://HOST/"}]},
            "backends[1].url",
            "the server of `backends[0].url`",
        ),
        (
            {"backends": [{"url": "https://host"}, {"url": "https://host:443"}]},
            "backends[1].url",
            "the server of `backends[0].url`",
        ),
        (
            {
                "backends": [
                    {"url": "http://a", "type": "vllm", "models": ["m"]},
                    {"url": "http://b", "type": "tgi", "models": ["m"]},
                ]
            },
            "backends[1].models",
            "backends of one type",
        ),
    ],
)
def test_bad_values_are_refused_with_one_line(document: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(document)
    text = str(refused.value)
    assert f"`{key}`" in text and message in text and "\n" not in text, text


@pytest.mark.parametrize("url", ["http://admin:s3cret@host:9001", "http://s3cret@host:9001"])
def test_credentials_in_a_url_are_refused_and_never_repeated(url: str) -> None:
    with pytest.raises(ConfigError, match=r"must not carry credentials") as refused:
        parse_config({"backends": [{"url": url}]})
    assert "s3cret" not in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        parse_config({"backends": [{"url": "http://a:9001", "metrics_url": url + "/metrics"}]})
    assert "s3cret" not in str(refused.value)


@pytest.mark.slow  # starts `irmiddleware serve` as a process
@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[[backends]]\nurl = "http://127.0.0.1:99999"\n', "`backends[0].url` must have a port in 1..65535"),
        (
            '[router.timeouts]\nread_s = nan\n[[backends]]\nurl = "http://127.0.0.1:9001"\n',
            "`router.timeouts.read_s` must be a finite number",
        ),
        (
            '[[backends]]\nurl = "http://127.0.0.1:9001"\nweight = inf\n',
            "`backends[0].weight` must be a finite",
        ),
        (
            '[[backends]]\nurl = "HTTP://127.0.0.1:80"\n[[backends]]\nurl = "http://127.0.0.1/"\n',
            "`backends[1].url` 'http://127.0.0.1' is the server of `backends[0].url`",
        ),
        ('[[backends]]\nurl = "http://ops:s3cret@127.0.0.1:9001"\n', "must not carry credentials"),
    ],
)
def test_serve_refuses_a_bad_config_with_one_line_and_exit_2(
    tmp_path: Path, toml: str, expected: str
) -> None:
    path = tmp_path / "router.toml"
    path.write_text('[router]\nlisten = "127.0.0.1:0"\n' + toml)
    result = subprocess.run(
        [sys.executable, "-m", "irmiddleware", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert expected in lines[0] and "s3cret" not in result.stderr, lines[0]
