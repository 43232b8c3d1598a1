"""Hostile backend answers, thrown at `LeanTransport` through a real socket on 127.0.0.1, end in a
clean transport error and never leave their connection in the pool; valid answers split at any
byte are read exactly.

hypothesis builds a valid answer (any method, status, headers, body, and Content-Length, chunked
or read-until-close framing), then damages it one way: cut short (with the backend closing or
going silent), a bare LF in the head or in the chunk framing, a bad chunk size, an oversized head,
too many headers, a huge or overflowing Content-Length, or garbage after a complete answer. The
backend writes it in pieces split at drawn places. Every outcome is either the exact body (then
the connection is pooled only when the answer allows it) or one of the documented errors
(`RemoteProtocolError`, its subclass `ResetAfterWrite`, `ReadError`, `ReadTimeout`), after which
the pool holds no connection: nothing leaks, nothing dirty is reused. Every read is bounded by the
client's read timeout and every scenario by `run_bounded`; nothing asserts on wall-clock time.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, replace

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from irmiddleware.http11 import LeanTransport
from tests.http11.http11_support import RawServer, eof, lean_client, read_request, run_bounded

_DOCUMENTED_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout)
_NO_BODY_STATUSES = (204, 304)
_KINDS = (
    "valid",
    "cut",
    "bare_lf_head",
    "bare_lf_chunk",
    "bad_chunk_size",
    "oversized_head",
    "many_headers",
    "huge_length",
    "garbage_after",
)
_ANY_FRAMING = ("length", "chunked", "close")
# The answers a kind of damage applies to: their framings, and whether they must carry a body.
_NEEDS = {
    "bare_lf_chunk": (("chunked",), True),
    "bad_chunk_size": (("chunked",), True),
    "huge_length": (("length",), True),
    "garbage_after": (("length", "chunked"), False),
}


@dataclass(frozen=True)
class Answer:
    """What the backend writes, and what a correct client makes of it."""

    method: str
    wire: bytes
    cuts: tuple[int, ...]  # where the backend splits its writes
    close: bool  # the backend closes after writing (else it waits for the client to close)
    body: bytes | None  # the body read; None: the exchange must fail
    pooled: bool  # on success, the connection goes back to the pool
    kind: str
    status: int
    headers: tuple[tuple[bytes, bytes], ...]  # the first headers a correct client reads
    tail: int = 0  # bytes at the end that go out in one write with the answer's end (garbage)


@dataclass(frozen=True)
class _Valid:
    head: bytes
    payload: bytes
    framing: str
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    no_body: bool
    crlfs: tuple[int, ...]  # offsets in `payload` of the chunk framing's CRLFs
    first_size: tuple[int, int]  # where the first chunk-size token is in `payload`


_token = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).filter(
    lambda name: name not in ("content-length", "transfer-encoding", "connection")
)
_value = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ;=,/.-_", max_size=40).map(
    str.strip
)


def _chunked(body: bytes, sizes: list[int]) -> tuple[bytes, tuple[int, ...], tuple[int, int]]:
    out, crlfs, position = b"", [], 0
    for size in [*sizes, len(body)]:
        piece = body[position : position + size]
        if not piece:
            break
        position += len(piece)
        line = b"%x" % len(piece)
        crlfs += [len(out) + len(line), len(out) + len(line) + 2 + len(piece)]
        out += line + b"\r\n" + piece + b"\r\n"
    crlfs.append(len(out) + 1)  # "0\r\n"
    out += b"0\r\n\r\n"
    first = (0, out.index(b"\r\n"))
    return out, tuple(crlfs), first


@st.composite
def _valid(draw: st.DrawFn, method: str, framings: tuple[str, ...], needs_body: bool) -> _Valid:
    statuses = [200, 201, 404, 429, 500, 503] + ([] if needs_body else list(_NO_BODY_STATUSES))
    status = draw(st.sampled_from(statuses))
    framing = draw(st.sampled_from(framings))
    body = draw(st.binary(min_size=int(needs_body), max_size=3000))
    fields = tuple((n.encode(), v.encode()) for n, v in draw(st.lists(st.tuples(_token, _value), max_size=6)))
    # Whitespace around a value is not part of it.
    pads = st.sampled_from([b"", b" ", b"\t", b" \t "])
    headers = b"".join(b"%s:%s%s%s\r\n" % (n, draw(pads), v, draw(pads)) for n, v in fields)
    no_body = method == "HEAD" or status in _NO_BODY_STATUSES
    crlfs: tuple[int, ...] = ()
    first = (0, 0)
    if framing == "length":
        headers += b"Content-Length: %d\r\n" % len(body)
        payload = body
    elif framing == "chunked":
        headers += b"Transfer-Encoding: chunked\r\n"
        payload, crlfs, first = _chunked(body, draw(st.lists(st.integers(1, 700), max_size=8)))
    else:
        payload = body
    head = b"HTTP/1.1 %d Whatever\r\n%s\r\n" % (status, headers)
    if no_body:
        payload, crlfs = b"", ()
    return _Valid(head, payload, framing, status, fields, no_body, crlfs, first)


@st.composite
def answers(draw: st.DrawFn) -> Answer:
    kind = draw(st.one_of(st.just("valid"), st.sampled_from(_KINDS[1:])))  # half of them valid
    framings, needs_body = _NEEDS.get(kind, (_ANY_FRAMING, False))
    method = draw(st.sampled_from(["GET", "POST"] + ([] if needs_body else ["HEAD"])))
    valid = draw(_valid(method, framings, needs_body))
    body = valid.payload
    if valid.no_body or valid.framing == "chunked":
        body = b"" if valid.no_body else _dechunk(valid.payload)
    # A self-delimiting answer leaves the connection reusable; one read until it closes does not
    # (nor a HEAD answer without framing: which length it describes cannot be known).
    self_delimiting = valid.framing != "close" or valid.status in _NO_BODY_STATUSES
    wire = valid.head + valid.payload
    answer = Answer(
        method, wire, (), not self_delimiting, body, self_delimiting, kind, valid.status, valid.headers
    )
    answer = _damage(draw, answer, valid)
    last = len(answer.wire) - answer.tail - 1
    cuts = draw(st.lists(st.integers(1, last), max_size=4, unique=True)) if last >= 1 else []
    return replace(answer, cuts=tuple(sorted(cuts)))


def _damage(draw: st.DrawFn, answer: Answer, valid: _Valid) -> Answer:
    """`answer` damaged the way its `kind` says (`_NEEDS`: `valid` is one it applies to)."""
    kind, head, payload = answer.kind, valid.head, valid.payload
    # A backend that goes silent instead of closing is the rarer case: each costs a read timeout.
    failed = replace(answer, body=None, close=draw(st.sampled_from([True, True, True, False])))
    if kind == "cut":
        # Cut before the end; an answer read until close is only cut short inside its head.
        end = len(head) if not answer.pooled else len(answer.wire)
        return replace(failed, wire=answer.wire[: draw(st.integers(0, end - 1))])
    if kind == "bare_lf_head":
        crlfs = [index for index in range(len(head) - 1) if head[index : index + 2] == b"\r\n"]
        index = draw(st.sampled_from(crlfs))
        return replace(failed, wire=head[:index] + head[index + 1 :] + payload)
    if kind == "bare_lf_chunk":
        index = draw(st.sampled_from(valid.crlfs))
        return replace(failed, wire=head + payload[:index] + payload[index + 1 :])
    if kind == "bad_chunk_size":
        bad = draw(st.sampled_from([b"zz", b"0x5", b"-1", b"+5", b" 5", b"", b"1" + b"f" * 20]))
        start, end = valid.first_size
        return replace(failed, wire=head + payload[:start] + bad + payload[end:])
    if kind == "oversized_head":
        big = b"X-Big: " + b"v" * draw(st.integers(64 * 1024, 200_000)) + b"\r\n"
        return replace(failed, wire=head[:-2] + big + b"\r\n" + payload)
    if kind == "many_headers":
        many = b"".join(b"X-%d: v\r\n" % number for number in range(draw(st.integers(257, 400))))
        return replace(failed, wire=head[:-2] + many + b"\r\n" + payload)
    if kind == "huge_length":
        huge = draw(st.sampled_from([10**12, 2**63 - 1, 2**64, 10**30]))
        wire = head.replace(b"Content-Length: %d" % len(payload), b"Content-Length: %d" % huge) + payload
        return replace(failed, wire=wire)
    if kind == "garbage_after":
        garbage = draw(st.binary(min_size=1, max_size=64).filter(lambda data: data.strip(b"\r\n")))
        return replace(answer, wire=answer.wire + garbage, pooled=False, close=False, tail=len(garbage))
    return answer


def _dechunk(payload: bytes) -> bytes:
    body, position = b"", 0
    while True:
        end = payload.index(b"\r\n", position)
        size = int(payload[position:end], 16)
        if not size:
            return body
        body += payload[end + 2 : end + 2 + size]
        position = end + 4 + size


async def _exchange(answer: Answer) -> None:
    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        bounds = [0, *answer.cuts, len(answer.wire)]
        for start, end in itertools.pairwise(bounds):
            writer.write(answer.wire[start:end])
            await writer.drain()
            await asyncio.sleep(0)  # lets the client read each piece on its own
        if not answer.close:
            await eof(reader)

    # A damaged answer may leave the client waiting: a short read timeout ends that. A valid one
    # never waits for the timeout, so a long one keeps a stalled machine from failing it.
    read_timeout = 0.1 if answer.body is None else 5.0
    async with RawServer(backend) as server, lean_client(read=read_timeout) as client:
        transport = client._transport
        assert isinstance(transport, LeanTransport)
        try:
            async with client.stream(answer.method, server.url) as response:
                body = await response.aread()
        except _DOCUMENTED_ERRORS:
            assert answer.body is None, "a valid answer failed"
            assert transport.stats()[:2] == (0, 0)  # closed, not pooled
            return
        assert answer.body is not None, f"a damaged answer ({answer.kind}) was accepted"
        assert (response.status_code, body) == (answer.status, answer.body)
        assert tuple(response.headers.raw[: len(answer.headers)]) == answer.headers
        assert transport.stats()[:2] == ((1, 1) if answer.pooled else (0, 0))


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(answer=answers())
def test_hostile_answers_end_in_a_clean_error_and_leave_nothing_pooled(answer: Answer) -> None:
    event(answer.kind)  # `pytest --hypothesis-show-statistics` shows how often each kind ran
    run_bounded(_exchange(answer))
