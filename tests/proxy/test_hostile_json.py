"""Hostile JSON in a request body gets 400 with an OpenAI-style error from the router, never a
500 and never a forward: nesting far deeper than Python's recursion limit (it used to escape as
`RecursionError`, a 500 with a traceback) or just past the 128-level bound, numbers that overflow
to infinity, `NaN`, a 100,000-digit integer, a duplicated key (the router and a backend could
read different models) and bytes that are not UTF-8. A body nested exactly 128 deep is still
routed, so the bound is where it says. Real vLLM emulators behind the router, real httpx clients;
the backend sees none of the refused requests."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from proxy_support import FAST, Emulator, RouterServer, config_for, wait_idle

from irmiddleware.proxy import create_app
from irmiddleware.testing import assert_idle, create_vllm_app, serve_in_thread


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


_PREFIX = b'{"model": "m", "prompt": "Hi", "max_tokens": 2'
HOSTILE = {
    "nesting far past the recursion limit": (_PREFIX + b', "x": ' + _nested(100_000) + b"}", "nested deeper"),
    "nesting one past the bound": (_PREFIX + b', "x": ' + _nested(128) + b"}", "nested deeper than 128"),
    "a float that overflows": (_PREFIX + b', "temperature": 1e999999}', "out of range"),
    "NaN": (_PREFIX + b', "temperature": NaN}', "NaN is not a JSON value"),
    "a 100,000-digit integer": (_PREFIX + b', "seed": ' + b"7" * 100_000 + b"}", "4300 digits"),
    "a duplicated model": (_PREFIX + b', "model": "other"}', "duplicate key 'model'"),
    "bytes that are not UTF-8": (_PREFIX + b', "prompt": "\xff"}', "not utf-8 text"),
}


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Emulator, RouterServer]]:
    """One emulated vLLM behind one router for the whole module (the cases share nothing)."""
    app = create_vllm_app(served_model_names=("m",), **FAST)
    with serve_in_thread(app) as server:
        backend = Emulator(server, app.state.emulator)
        with RouterServer(create_app(config_for([backend.url]))) as router:
            yield backend, router


def _post(router: RouterServer, body: bytes) -> httpx.Response:
    headers = {"content-type": "application/json"}
    return httpx.post(f"{router.url}/v1/completions", content=body, headers=headers)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_json_gets_400_from_the_router(case: str, served: tuple[Emulator, RouterServer]) -> None:
    backend, router = served
    body, reason = HOSTILE[case]
    completed = backend.emulator.stats.completed
    response = _post(router, body)
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400
    assert error["message"].startswith("request body is not valid JSON: ") and reason in error["message"]
    assert backend.emulator.stats.completed == completed  # refused by the router, never forwarded
    wait_idle(router.app)
    assert_idle(router.app.router)


def test_a_body_nested_exactly_as_deep_as_the_bound_is_routed(served: tuple[Emulator, RouterServer]) -> None:
    backend, router = served
    completed = backend.emulator.stats.completed
    # 127 arrays inside the body's object: 128 levels in all.
    response = _post(router, _PREFIX + b', "x": ' + _nested(127) + b"}")
    assert response.status_code == 200, response.text[:300]
    assert backend.emulator.stats.completed == completed + 1
    wait_idle(router.app)
    assert_idle(router.app.router)
