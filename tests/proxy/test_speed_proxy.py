"""Learned speed end to end: behind a router with `[router.speed] enabled`, two vLLM emulators, one
four times slower than the other at prefill and decode, answer streamed chat completions sent by the
official openai client. The router's status document and /metrics then show each backend's learned
prefill and decode rates, the slow backend's rates and core weight are below the fast one's, and
every in-flight counter returns to zero. When an emulator is slowed mid-run (`reconfigure(speed=)`)
its learned decode rate and weight fall below its twin's, and rise again once it recovers. Order
only: no time is asserted."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from proxy_support import Emulator, RouterServer, backend_status, config_for, wait_idle

from irmiddleware.testing import assert_idle

PROMPT = "Tell me about the weather in a long and winding way, please. " * 20


def stream_chats(url: str, count: int) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    for number in range(count):
        stream = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": f"{number}. {PROMPT}"}],
            max_tokens=12,
            stream=True,
        )
        assert sum(1 for _ in stream) > 1


@pytest.mark.slow
def test_the_slower_backend_is_learned_slower_and_weighs_less(
    emulators: Callable[..., list[Emulator]], router: Callable[..., RouterServer]
) -> None:
    fast = emulators(1, time_per_prompt_token_s=0.00005, time_per_output_token_s=0.002)[0]
    slow = emulators(1, time_per_prompt_token_s=0.0002, time_per_output_token_s=0.008)[0]
    config = config_for(
        [fast.url, slow.url], strategy="round_robin", speed={"enabled": True, "interval_s": 0.01}
    )
    server = router(config)
    stream_chats(server.url, 24)
    wait_idle(server.app)
    assert_idle(server.app.router)
    fast_status, slow_status = backend_status(server, fast.url), backend_status(server, slow.url)
    assert 0 < slow_status["prefill_tokens_per_s"] < fast_status["prefill_tokens_per_s"]
    assert 0 < slow_status["decode_tokens_per_s"] < fast_status["decode_tokens_per_s"]
    assert slow_status["weight"] < 1.0 < fast_status["weight"]
    # The batch clock's learned times (least_ttft's wait for a slot): sent to end, first byte to end.
    assert 0 < fast_status["decode_s"] < slow_status["decode_s"]
    assert 0 < fast_status["service_s"] < slow_status["service_s"]
    assert fast_status["decode_s"] < fast_status["service_s"]
    learned = {
        (sample.name, sample.labels["backend"]): sample.value
        for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
        for sample in family.samples
        if sample.name.startswith("irm_backend_") and sample.name.endswith("_tokens_per_second")
    }
    assert (
        learned[("irm_backend_decode_tokens_per_second", slow.url)]
        < learned[("irm_backend_decode_tokens_per_second", fast.url)]
    )
    assert learned[("irm_backend_prefill_tokens_per_second", fast.url)] > 0


@pytest.mark.slow
def test_a_slowed_backend_loses_weight_and_regains_it_after_recovering(
    emulators: Callable[..., list[Emulator]], router: Callable[..., RouterServer]
) -> None:
    steady, changing = emulators(2, time_per_prompt_token_s=0.00005, time_per_output_token_s=0.003)
    speed = {"enabled": True, "interval_s": 0.01, "half_life_s": 0.2}
    server = router(config_for([steady.url, changing.url], strategy="round_robin", speed=speed))
    stream_chats(server.url, 8)
    changing.emulator.reconfigure(speed=0.25)
    stream_chats(server.url, 16)
    slowed = backend_status(server, changing.url)
    assert slowed["decode_tokens_per_s"] < backend_status(server, steady.url)["decode_tokens_per_s"]
    assert slowed["weight"] < 1.0
    changing.emulator.reconfigure(speed=1.0)
    stream_chats(server.url, 24)
    recovered = backend_status(server, changing.url)
    assert recovered["weight"] > slowed["weight"]
    assert recovered["decode_tokens_per_s"] > slowed["decode_tokens_per_s"]
    wait_idle(server.app)
    assert_idle(server.app.router)
