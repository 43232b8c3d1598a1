"""The vLLM emulator's prefix cache: a repeated prompt prefix is a hit (counted in vLLM's
`vllm:prefix_cache_queries_total` / `_hits_total` as prompt and cached tokens), a different prefix
is not, and the LRU forgets what no longer fits. Driven with the openai client over real HTTP.
It is the simulator's prefix cache too (one class), and the simulator imports without the `testing`
extra (Starlette, uvicorn)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from irmiddleware.testing import (
    PrefixCache,
    VLLMConfig,
    block_hashes,
    count_tokens,
    create_vllm_app,
    serve_in_thread,
)

SYSTEM = "You are a careful assistant who answers briefly. " * 8  # ~400 characters: 6 blocks


def prefix_counters(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = sample.value
    return values["vllm:prefix_cache_queries_total"], values["vllm:prefix_cache_hits_total"]


def chat(client: openai.OpenAI, user: str) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    client.chat.completions.create(model="m", messages=messages, max_tokens=2)  # type: ignore[arg-type]


def test_a_shared_prefix_hits_and_a_new_one_misses() -> None:
    config = VLLMConfig(served_model_names=("m",), prefix_cache_blocks=256, time_per_output_token_s=0.0)
    with serve_in_thread(create_vllm_app(config)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        chat(client, "first question")
        queries, hits = prefix_counters(server.url)
        assert queries > 0
        assert hits == 0
        chat(client, "second question")
        queries_after, hits_after = prefix_counters(server.url)
        rendered_system = f"system: {SYSTEM}"
        # At least the system prompt's whole blocks were cached (the "user:" line differs).
        cached_chars = (len(rendered_system) // 64) * 64
        assert hits_after >= count_tokens(rendered_system[:cached_chars]) > 0
        assert hits_after < queries_after - queries  # the new question itself was not cached


def test_the_cache_forgets_least_recently_used_blocks() -> None:
    config = VLLMConfig(served_model_names=("m",), prefix_cache_blocks=8, time_per_output_token_s=0.0)
    with serve_in_thread(create_vllm_app(config)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        chat(client, "a")
        for other in range(3):  # other long prompts push the first out of 8 blocks
            client.completions.create(model="m", prompt=f"{other} " + "filler text " * 60, max_tokens=1)
        _queries, hits_before = prefix_counters(server.url)
        chat(client, "a")
        _queries, hits_after = prefix_counters(server.url)
        assert hits_after == hits_before


def test_block_hashes_chain_over_the_whole_prefix() -> None:
    first = block_hashes("a" * 64 + "b" * 64, 64)
    second = block_hashes("c" * 64 + "b" * 64, 64)
    assert len(first) == len(second) == 2
    assert first[1] != second[1]  # same second block, different prefix: no match
    assert block_hashes("a" * 64 + "b" * 70, 64)[:2] == first


def test_the_simulator_keeps_the_same_prefix_cache() -> None:
    import irmiddleware.sim._engine

    assert irmiddleware.sim._engine.PrefixCache is PrefixCache


@pytest.mark.slow
def test_the_simulator_imports_without_starlette_or_uvicorn() -> None:
    # A None entry in sys.modules makes `import starlette` fail, as if it were not installed.
    code = (
        "import sys\n"
        "sys.modules['starlette'] = sys.modules['uvicorn'] = None\n"
        "import irmiddleware.sim\n"
        "assert not any(name.startswith('irmiddleware.testing') for name in sys.modules)\n"
        "sys.modules['starlette'] = None\n"
        "try:\n"
        "    import irmiddleware.testing\n"
        "except ImportError:\n"
        "    print('blocked')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "blocked"  # The check itself can fail: the block works.
