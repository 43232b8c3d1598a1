"""`bench-predict --explain`'s reading of a router's JSON access log: which backend each turn of
each conversation went to, the moves (a turn sent away from its previous turn's backend), the
prompt characters they refilled (less what the new backend held from the conversation's last
turn there, or the shared prefix), and the most requests each backend had in flight at once.
Lines that are not a named turn are skipped."""

from __future__ import annotations

import json

from irmiddleware.bench._moves import explain, read_turns

A, B = "http://127.0.0.1:1", "http://127.0.0.1:2"


def _line(request_id: str, backend: str, ended: str, duration_s: float) -> str:
    entry = {"time": ended, "request_id": request_id, "backend": backend, "duration_s": duration_s}
    return "noise before the JSON " + json.dumps(entry)


def test_moves_refills_and_the_most_in_flight_are_read_from_the_access_log() -> None:
    lines = [
        "a line that is not JSON",
        _line("c0-t0", A, "2026-12-02T10:00:01.000Z", 0.5),
        _line("c0-t1", B, "2026-12-02T10:00:02.000Z", 0.5),  # moved to B: refills t1 less the shared
        _line("c0-t2", A, "2026-12-02T10:00:03.000Z", 0.5),  # back to A: refills t2 less t0's prompt
        _line("c1-t0", A, "2026-12-02T10:00:02.900Z", 0.5),  # beside c0-t2 on A
        _line("c1-t1", A, "2026-12-02T10:00:04.000Z", 0.5),
        _line("warmup", A, "2026-12-02T10:00:04.000Z", 0.5),  # not a named turn
        '{"request_id": "c9-t0", "backend": 3}',  # no time: skipped
    ]
    turns = read_turns(lines)
    assert sorted(turns) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert turns[0, 1].backend == B and turns[0, 1].ended_s - turns[0, 1].sent_s == 0.5
    ttfts = {(0, 0): 0.1, (0, 1): 0.3, (0, 2): 0.2, (1, 0): 0.05, (1, 1): 0.04}
    chars = {(0, 0): 1000, (0, 1): 1400, (0, 2): 1800, (1, 0): 1000, (1, 1): 1400}
    summary, *slowest = explain(turns, ttfts, chars, shared_chars=900, backends=[A, B], slowest=2)
    assert "per backend [2, 1]" in summary
    assert "moves: 2 in 1 conversations, by turn {1: 1, 2: 1}, 1 back" in summary
    refilled = (1400 - 900) + (1800 - 1000)
    assert f"refilled {refilled} prompt characters, {100 * refilled / 6600:.2f} % of all" in summary
    assert slowest[0].startswith("  300 ms: conversation 0 turn 1 on backend 1, moved from 0")
    assert slowest[1].startswith("  200 ms: conversation 0 turn 2 on backend 0, moved from 1")
    assert slowest[1].endswith("in flight then per backend [1, 0]")  # c1-t0 was running on A
