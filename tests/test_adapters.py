"""The adapters' split: `hooks.BackendAdapter` is the protocol-neutral contract (nothing of OpenAI in
its defaults), `irmiddleware.adapters.OpenAIAdapter` implements the OpenAI protocol (model, affinity,
errors, model list), vLLM and TGI build on it, Triton does not, and the built-in plugins register
exactly these classes."""

from __future__ import annotations

import json

import pytest

from irmiddleware import _plugins
from irmiddleware.adapters import OpenAIAdapter, TGIAdapter, TritonAdapter, VLLMAdapter, prompt_text
from irmiddleware.hooks import AdapterError, BackendAdapter, Endpoint

CHAT = Endpoint("/v1/chat/completions", frozenset({"POST"}))


def test_the_contract_is_protocol_neutral() -> None:
    neutral = BackendAdapter()
    assert neutral.endpoints == () and neutral.models_path is None
    with pytest.raises(NotImplementedError):
        neutral.model_of(CHAT, CHAT.path, b'{"model": "m"}')
    assert neutral.affinity_of(CHAT, b'{"user": "u", "prompt": "p"}') == (None, None)
    assert json.loads(neutral.error_body(503, "busy")) == {"error": "busy"}
    assert json.loads(neutral.models_body(["a", "b"], 0)) == ["a", "b"]
    assert neutral.health_answer(False) == (503, b'{"error": "No backend is ready."}')


def test_openai_adapter_reads_model_affinity_and_answers_openai_errors() -> None:
    adapter = OpenAIAdapter()
    assert adapter.model_of(CHAT, CHAT.path, b'{"model": "m"}') == "m"
    for body in (b"not json", b"[]", b'{"model": 3}'):
        with pytest.raises(AdapterError) as raised:
            adapter.model_of(CHAT, CHAT.path, body)
        assert raised.value.status == 400
    first = {"model": "m", "user": "u", "messages": [{"role": "user", "content": "Hi"}]}
    second = {**first, "messages": [*first["messages"], {"role": "assistant", "content": "Hello"}]}
    key, prompt = adapter.affinity_of(CHAT, json.dumps(first).encode())
    _, longer = adapter.affinity_of(CHAT, json.dumps(second).encode())
    assert key == "u" and prompt == "user\nHi\n" and longer is not None and longer.startswith(prompt)
    assert prompt_text({"prompt": ["a", "b"]}) == "a" and prompt_text({}) is None
    error = json.loads(adapter.error_body(404, "no such model", "model"))["error"]
    assert error == {"message": "no such model", "type": "NotFoundError", "param": "model", "code": 404}
    cards = json.loads(adapter.models_body(["m"], 7))
    assert cards["object"] == "list" and cards["data"][0]["id"] == "m"
    assert adapter.parse_models(json.dumps(cards).encode()) == ["m"]


def test_vllm_and_tgi_build_on_openai_and_plugins_register_the_adapters() -> None:
    assert issubclass(VLLMAdapter, OpenAIAdapter) and issubclass(TGIAdapter, OpenAIAdapter)
    assert not issubclass(TritonAdapter, OpenAIAdapter) and issubclass(TritonAdapter, BackendAdapter)
    registry = _plugins.collect(*_plugins.load_plugins())  # the entry points, through pluggy
    registered = {name: registry.adapters[name][0] for name in ("openai", "vllm", "tgi", "triton")}
    assert registered == {
        "openai": OpenAIAdapter,
        "vllm": VLLMAdapter,
        "tgi": TGIAdapter,
        "triton": TritonAdapter,
    }
    assert all(registered[name]().type_name == name for name in registered)
