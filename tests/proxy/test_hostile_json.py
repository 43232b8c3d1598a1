"""Hostile JSON in a request body gets 400 with an OpenAI-style error from the router, never a
500 and never a forward: nesting far deeper than Python's recursion limit (it used to escape as
`RecursionError`, a 500 with a traceback) or just past the 128-level bound, numbers that overflow
to infinity, `NaN`, a 100,000-digit integer, a duplicated key (the router and a backend could
read different models) and bytes that are not UTF-8. A body nested exactly 128 deep is still
routed, so the bound is where it says. Real vLLM emulators behind the router, real httpx clients;
the backend sees none of the refused requests."""

from __future__ import annotations

import httpx
import pytest
from proxy_support import Emulators, Routers, config_for, wait_idle

from irmiddleware.testing import assert_idle


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
    "bytes that are not UTF-8": (_PREFIX + b', "prompt": "\xff"}', "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_json_gets_400_from_the_router(case: str, emulators: Emulators, router: Routers) -> None:
    (backend,) = emulators(1)
    server = router(config_for([backend.url]))
    body, reason = HOSTILE[case]
    response = httpx.post(
        f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400
    assert error["message"].startswith("request body is not valid JSON: ") and reason in error["message"]
    assert backend.emulator.stats.completed == 0  # refused by the router, never forwarded
    wait_idle(server.app)
    assert_idle(server.app.router)


def test_a_body_nested_exactly_as_deep_as_the_bound_is_routed(emulators: Emulators, router: Routers) -> None:
    (backend,) = emulators(1)
    server = router(config_for([backend.url]))
    # 127 arrays inside the body's object: 128 levels in all.
    body = _PREFIX + b', "x": ' + _nested(127) + b"}"
    response = httpx.post(
        f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text[:300]
    wait_idle(server.app)
    assert_idle(server.app.router)
