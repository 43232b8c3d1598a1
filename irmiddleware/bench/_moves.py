"""`bench-predict --explain`: where each turn of each conversation went, from the router's JSON
access log (request ids `c<conversation>-t<turn>`), and what that cost.

A *move* is a turn sent to another backend than the conversation's previous turn: the new
backend fills the part of the prompt it does not hold, the cache misses a router can cause (the
new message of each turn is a miss wherever it goes). The refill is estimated in prompt
characters: the whole prompt less what the backend held from this conversation's last turn there,
or less the shared system prompt if it never had one. The slowest turns are listed with the
requests in flight on each backend when they were sent (from each access line's end time and
duration), which shows whether a slot was free elsewhere.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

__all__ = ["Turn", "explain", "read_turns"]

_REQUEST_ID = re.compile(r"c(\d+)-t(\d+)")


@dataclass(frozen=True, slots=True)
class Turn:
    backend: str
    sent_s: float
    ended_s: float


def read_turns(lines: Iterable[str]) -> dict[tuple[int, int], Turn]:
    """(conversation, turn) -> where it went and when, from a JSON-lines access log."""
    turns: dict[tuple[int, int], Turn] = {}
    for line in lines:
        start = line.find("{")
        if start < 0 or '"request_id"' not in line:
            continue
        try:
            entry = json.loads(line[start:])
            match = _REQUEST_ID.fullmatch(entry.get("request_id", ""))
            if match is None:
                continue
            ended = datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()
            turns[int(match[1]), int(match[2])] = Turn(
                entry["backend"], ended - float(entry["duration_s"]), ended
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return turns


def explain(
    turns: dict[tuple[int, int], Turn],
    ttfts: dict[tuple[int, int], float],
    prompt_chars: dict[tuple[int, int], int],
    shared_chars: int,
    backends: list[str],
    slowest: int = 5,
) -> list[str]:
    """Lines describing one run's moves and slowest turns (measured conversations only: those
    with a time to first token in `ttfts`)."""
    index = {url: number for number, url in enumerate(backends)}
    moves: Counter[int] = Counter()
    back = refilled = total = 0
    moved_conversations: set[int] = set()
    for conversation, turn in sorted(ttfts):
        here, chars = turns.get((conversation, turn)), prompt_chars.get((conversation, turn), 0)
        total += chars
        before = turns.get((conversation, turn - 1))
        if here is None or before is None or here.backend == before.backend:
            continue
        moves[turn] += 1
        moved_conversations.add(conversation)
        held = shared_chars
        for earlier in range(turn - 1, -1, -1):  # the last turn this backend saw
            seen = turns.get((conversation, earlier))
            if seen is not None and seen.backend == here.backend:
                held, back = prompt_chars.get((conversation, earlier), shared_chars), back + 1
                break
        refilled += max(0, chars - held)
    lines = [
        f"most requests in flight at once per backend {_most_in_flight(turns, index)}; "
        f"moves: {sum(moves.values())} in {len(moved_conversations)} conversations, by turn "
        f"{dict(sorted(moves.items()))}, {back} back to a backend the conversation had been on; "
        f"refilled {refilled} prompt characters, {100 * refilled / total if total else 0:.2f} % of all"
    ]
    for ttft, conversation, turn in sorted(((t, c, n) for (c, n), t in ttfts.items()), reverse=True)[
        :slowest
    ]:
        here = turns.get((conversation, turn))
        if here is None:
            continue
        before = turns.get((conversation, turn - 1))
        busy = [0] * len(backends)
        for key, other in turns.items():
            if (
                key != (conversation, turn)
                and other.backend in index
                and other.sent_s <= here.sent_s < other.ended_s
            ):
                busy[index[other.backend]] += 1
        came = ""
        if before is not None and before.backend != here.backend:
            came = f", moved from {index.get(before.backend)}"
        lines.append(
            f"  {1000 * ttft:.0f} ms: conversation {conversation} turn {turn} on backend "
            f"{index.get(here.backend)}{came}; in flight then per backend {busy}"
        )
    return lines


def _most_in_flight(turns: dict[tuple[int, int], Turn], index: dict[str, int]) -> list[int]:
    """The most requests each backend had in flight at once (warm-up included), by a sweep over
    the sends and ends in time order (an end before a send at the same instant)."""
    known = [turn for turn in turns.values() if turn.backend in index]
    events = sorted(
        [(turn.sent_s, 1, index[turn.backend]) for turn in known]
        + [(turn.ended_s, -1, index[turn.backend]) for turn in known]
    )
    now, most = [0] * len(index), [0] * len(index)
    for _, step, backend in events:
        now[backend] += step
        most[backend] = max(most[backend], now[backend])
    return most
