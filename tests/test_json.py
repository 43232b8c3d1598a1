"""`irmiddleware._json.loads_body`, the one reader of request bodies: it reads what JSON allows
(and what clients send: long conversations, floats that underflow to 0, nesting up to the bound)
exactly as `json.loads` does, and refuses with a `JSONBodyError` (a `ValueError`, so every caller's
`except ValueError` holds) each thing it promises to refuse: nesting past `MAX_DEPTH` (however
deep, never a `RecursionError`), non-finite numbers and the NaN/Infinity literals, over-long
integers, a key repeated in one object (at any depth), bytes that do not decode, and JSON that
is simply malformed."""

from __future__ import annotations

import json

import pytest

from irmiddleware._json import MAX_DEPTH, JSONBodyError, loads_body

ACCEPTED = [
    b'{"model": "m", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.7}',
    json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}] * 600}).encode(),
    b'{"x": 1e-999999, "y": -0.0, "z": 12345678901234567890}',
    b"[" * MAX_DEPTH + b"]" * MAX_DEPTH,
    b'{"a": {"a": {"a": 1}}, "b": [{"a": 1}, {"a": 2}]}',  # the same key in different objects
    '{"content": "caf\u00e9 \u2603"}'.encode(),
    '{"content": "caf\u00e9"}'.encode("utf-8-sig"),  # a byte-order mark, as json.loads allows
    '{"content": "caf\u00e9"}'.encode("utf-16"),
    b"3",
]

REFUSED = {
    b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1): f"nested deeper than {MAX_DEPTH} levels",
    b"[" * 1_000_000 + b"]" * 1_000_000: "nested deeper",
    b'{"x": ' + b"[" * 200_000: "nested deeper",  # deep and truncated
    b'{"x": 1e999999}': "'1e999999' is out of range",
    b'{"x": -1e400}': "out of range",
    b'{"x": NaN}': "NaN is not a JSON value",
    b'{"x": -Infinity}': "-Infinity is not a JSON value",
    b'{"x": ' + b"9" * 100_000 + b"}": "4300 digits",
    b'{"model": "a", "model": "b"}': "duplicate key 'model'",
    b'{"m": [{"k": 1, "k": 1}]}': "duplicate key 'k'",
    b'{"x": "\xff"}': "not utf-8 text",
    b'{"x": }': "Expecting value",
    b"": "Expecting value",
}


@pytest.mark.parametrize("body", ACCEPTED, ids=range(len(ACCEPTED)))
def test_what_json_allows_reads_as_json_loads_reads_it(body: bytes) -> None:
    assert loads_body(body) == json.loads(body)


@pytest.mark.parametrize("body", sorted(REFUSED, key=len), ids=range(len(REFUSED)))
def test_what_it_promises_to_refuse_is_a_value_error_that_says_why(body: bytes) -> None:
    with pytest.raises(JSONBodyError, match=REFUSED[body]) as refused:
        loads_body(body)
    assert isinstance(refused.value, ValueError)
