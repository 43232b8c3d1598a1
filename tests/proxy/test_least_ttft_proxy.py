"""Costs in tokens and least_ttft in the proxy. `RequestCost` counts a prompt's tokens plus the
request's output limit (or the learned or default expected output), bounded by `per_slot`; a bad
`[router] cost` is one clear ConfigError. End to end, behind vLLM emulators driven concurrently
by the official openai client, a router with `cost = "tokens"` and `least_ttft` scales each
backend's capacity to tokens, routes every request, and every in-flight counter (requests and
tokens) returns to zero afterwards: what was reserved, discounted or not, was given back. The
example configuration in doc/proxy.md loads; a bad `batch_slots` is one clear ConfigError."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from proxy_support import Emulator, RouterServer, backend_status, config_for, wait_idle

from irmiddleware.proxy._cost import RequestCost
from irmiddleware.proxy.config import ConfigError, parse_config
from irmiddleware.testing import assert_idle

BACKENDS = [{"url": "http://127.0.0.1:9", "models": ["m"]}]
SYSTEM = "You are a meticulous assistant. Answer briefly but completely, in English. " * 6


def cost_model(**router: object) -> RequestCost:
    return RequestCost(parse_config({"router": router, "backends": BACKENDS}))


def test_a_request_costs_its_prompt_and_output_tokens() -> None:
    assert cost_model().of("x" * 400, b"{}") == 1  # cost = requests: always 1
    tokens = cost_model(cost="tokens", tokens={"per_slot": 1000, "output_default": 50})
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30}).encode()
    assert tokens.of("x" * 400, body) == 100 + 30
    assert tokens.of("x" * 400, b'{"prompt": "say \\"max_tokens\\": 5"}') == 100 + 50  # not a key
    assert tokens.of(None, b"y" * 40) == 10 + 50  # no prompt text: the body's size
    assert tokens.of("x" * 40_000, body) == 1000  # at most per_slot
    tokens.observe_output(10)
    assert tokens.of("x" * 400, b"{}") == 100 + 10  # the learned average replaces the default
    assert tokens.capacity_scale == 1000 and cost_model().capacity_scale == 1


def test_a_bad_cost_is_one_clear_config_error() -> None:
    with pytest.raises(ConfigError, match=r"router\.cost"):
        parse_config({"router": {"cost": "dollars"}, "backends": BACKENDS})
    with pytest.raises(ConfigError, match="per_slot"):
        parse_config({"router": {"tokens": {"per_slot": 0}}, "backends": BACKENDS})


def chat(base_url: str, session: int, turns: int) -> int:
    """One conversation of `turns` streamed turns; returns how many answers came back."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
    history = [{"role": "system", "content": SYSTEM}]
    answered = 0
    for turn in range(turns):
        history.append({"role": "user", "content": f"Session {session}, question {turn}: why?"})
        stream = client.chat.completions.create(
            model="m",
            messages=history,  # type: ignore[arg-type]
            max_tokens=8,
            stream=True,
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        history.append({"role": "assistant", "content": text})
        answered += 1
    return answered


@pytest.mark.slow
def test_least_ttft_with_costs_in_tokens_gives_back_every_token(
    emulators: Callable[..., list[Emulator]], router: Callable[..., RouterServer]
) -> None:
    fleet = emulators(3, prefix_cache_blocks=1024, time_per_output_token_s=0.002)
    config = config_for(
        [e.url for e in fleet], strategy="least_ttft", cost="tokens", tokens={"per_slot": 512}
    )
    server = router(config)
    with ThreadPoolExecutor(6) as pool:
        answered = sum(pool.map(lambda session: chat(server.url, session, 4), range(12)))
    assert answered == 48
    wait_idle(server.app)
    assert_idle(server.app.router)
    status = backend_status(server, fleet[0].url)
    assert status["capacity"] == 8 * 512 and status["load"] == 0
    assert sum(s.routed for s in server.app.router.stats()) == 48


def test_the_documented_example_configuration_loads() -> None:
    text = (Path(__file__).resolve().parents[2] / "doc" / "proxy.md").read_text()
    section = text[text.index("## Predictive routing") :]
    example = section[
        section.index("```toml") + len("```toml") : section.index("```", section.index("```toml") + 7)
    ]
    config = parse_config(tomllib.loads(example))
    assert (config.strategy, config.cost, config.tokens.per_slot, config.speed.half_life_s) == (
        "least_ttft",
        "tokens",
        2048,
        2.0,
    )
    assert config.backends[0].batch_slots == 32


def test_bad_batch_slots_are_one_clear_config_error() -> None:
    for bad in (-1, 1_000_001, "4"):
        with pytest.raises(ConfigError, match=r"backends\[0\]\.batch_slots"):
            parse_config({"backends": [{**BACKENDS[0], "batch_slots": bad}]})
    assert parse_config({"backends": BACKENDS}).backends[0].batch_slots == 0
