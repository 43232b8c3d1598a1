"""One strict reader for the JSON request bodies the router looks into (the model, the affinity
key, the priority). It refuses what a client should never send and what two parsers could read
differently, with a `ValueError` whose message says what was wrong, so every caller answers 400
(or ignores the body) and nothing escapes as a 500:

- nesting deeper than `MAX_DEPTH` arrays and objects (Python's own parser would raise
  `RecursionError` somewhere near 1,000, depending on the stack it runs on);
- numbers that are not finite (`1e999999` overflows to infinity) and the `NaN`/`Infinity`
  literals, which are not JSON; integers longer than the interpreter's digit limit (4,300 by
  default) fail in the parser itself;
- a key repeated in one object: the router would read one `model` while a backend whose parser
  keeps the other occurrence serves another, so the request is ambiguous and refused.

The text is decoded as `json.loads` decodes bytes (UTF-8, with or without a byte-order mark, or
UTF-16/32 told by the first bytes), so the router reads what a Python backend reads; bytes that
do not decode are refused too.

Standard library only, so any layer may use it.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

__all__ = ["MAX_DEPTH", "JSONBodyError", "loads_body"]

MAX_DEPTH: Final = 128
"""Arrays and objects nested deeper than this are refused (the limit Rust's serde_json uses, so a
body the router accepts is one TGI's parser accepts too)."""


class JSONBodyError(ValueError):
    """The body is not JSON the router accepts; the message says why (a sentence fragment that
    reads after "request body is not valid JSON: ")."""


def loads_body(body: bytes) -> Any:
    """The JSON value of a request body, read strictly (the rules in the module docstring);
    `JSONBodyError`, a `ValueError`, for anything refused."""
    # A body that opens with `{` and a second non-NUL byte is UTF-8 to `detect_encoding` (no
    # byte-order mark starts with `{`): the usual request is told without its Python checks.
    encoding = "utf-8" if body[:1] == b"{" and body[1:2] not in (b"", b"\x00") else json.detect_encoding(body)
    try:
        value = _DECODER.decode(body.decode(encoding, "surrogatepass"))
    except UnicodeDecodeError as error:
        raise JSONBodyError(f"not {encoding} text ({error.reason} at byte {error.start})") from None
    except RecursionError:
        raise JSONBodyError(f"nested deeper than {MAX_DEPTH} levels") from None
    except JSONBodyError:
        raise
    except ValueError as error:  # json.JSONDecodeError, or an integer over the digit limit
        raise JSONBodyError(str(error)) from None
    # Most bodies have too few brackets to be deep at all; only the others are walked.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _depth_exceeds(value, MAX_DEPTH):
        raise JSONBodyError(f"nested deeper than {MAX_DEPTH} levels")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JSONBodyError(f"duplicate key {key!r} in an object")
            seen.add(key)
    return result


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONBodyError(f"number {text[:32]!r} is out of range")
    return value


def _constant(name: str) -> float:
    raise JSONBodyError(f"{name} is not a JSON value")


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether `value` nests arrays and objects deeper than `limit`: breadth first, one level of
    containers at a time, so no recursion and each container is visited once."""
    level: list[Any] = [value] if isinstance(value, (dict, list)) else []
    depth = 1
    while level:
        if depth > limit:
            return True
        deeper = []
        for item in level:
            for child in item.values() if isinstance(item, dict) else item:
                if isinstance(child, (dict, list)):
                    deeper.append(child)
        level = deeper
        depth += 1
    return False


_DECODER: Final = json.JSONDecoder(object_pairs_hook=_object, parse_float=_float, parse_constant=_constant)
