"""`irmiddleware bench-affinity`: what a cache-aware routing decision costs, through the public API.

Chat-like prompts of about 4,000 tokens (~16,000 characters: a shared system prompt, then the
session's earlier turns, then the new message) are routed the way a proxy would: hash the prompt
(`prefix_hashes(text)`), decide (`Router.acquire(prefix_hashes=...)`), release. Sessions advance
turn by turn, so each decision finds the session's previous turn in the index (the common case:
a long partial match, then the index learns the new blocks). Each operation is timed on its own
(`perf_counter_ns`, whose own cost, ~0.1 µs, is included); the report gives median and p99 per
part, for prefix_affinity and least_ttft (which also scores every accelerator by expected time to
first token), with a consistent_hash decision and a plain p2c decision measured in the same run as
baselines. Prints numbers; asserts nothing (benchmarks are not tests).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Sequence

from irmiddleware import Accelerator, Router, prefix_hashes
from irmiddleware.bench._harness import format_table, quantile

_VOCABULARY = (
    "the model request server cache token prompt user assistant answer question latency batch route "
    "fleet memory block prefix system session turn reply context window please explain why"
)
_WORDS = tuple(_VOCABULARY.split())
_SYSTEM_CHARS = 4_000
_TURN_CHARS = 1_500  # one user message and its answer, about
_GOAL_US = 50.0


def _text(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    length = 0
    while length < chars:  # Bounded: every word adds at least two characters.
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:chars]


def chat_prompts(sessions: int, prompt_chars: int, seed: int) -> list[tuple[int, str]]:
    """(session, prompt) pairs in routing order: every session's first turn, then every second
    turn, ...; the last turn of each is `prompt_chars` long."""
    rng = random.Random(seed)
    system = "You are a helpful assistant. " + _text(rng, _SYSTEM_CHARS)
    turns_count = max(1, -(-(prompt_chars - len(system)) // _TURN_CHARS))
    turn_chars = max(1, (prompt_chars - len(system)) // turns_count)
    histories = [[_text(rng, turn_chars) for _ in range(turns_count)] for _ in range(sessions)]
    prompts = []
    for turn in range(1, turns_count + 1):
        for session, history in enumerate(histories):
            prompts.append((session, system + "".join(history[:turn])))
    return prompts


def _fleet(strategy: str, accelerators: int) -> Router:
    router = Router(strategy, max_accelerators=accelerators, seed=1)
    for index in range(accelerators):
        router.add_accelerator(Accelerator(index, 1_000_000))  # Capacity never limits here.
        if strategy == "least_ttft":  # its longer path: batch slots known, as behind vLLM
            router.set_batch_slots(index, 32)
    return router


def _timed(operation: Callable[[], object]) -> int:
    started = time.perf_counter_ns()
    operation()
    return time.perf_counter_ns() - started


def measure_prefix(
    prompts: Sequence[tuple[int, str]], accelerators: int, strategy: str = "prefix_affinity"
) -> dict[str, list[int]]:
    """Nanoseconds per prompt: hashing, decision + release, and the whole (timed separately)."""
    samples: dict[str, list[int]] = {"hashing": [], "decision+release": [], "total": []}
    with _fleet(strategy, accelerators) as router:
        for _session, text in prompts:
            hashes = prefix_hashes(text)
            samples["hashing"].append(_timed(lambda: prefix_hashes(text)))  # noqa: B023 (called at once)
            samples["decision+release"].append(
                _timed(lambda: router.acquire(1, prefix_hashes=hashes).release())  # type: ignore[union-attr]  # noqa: B023
            )
    with _fleet(strategy, accelerators) as router:
        for _session, text in prompts:
            samples["total"].append(
                _timed(lambda: router.acquire(1, prefix_hashes=prefix_hashes(text)).release())  # type: ignore[union-attr]  # noqa: B023
            )
    return samples


def measure_plain(strategy: str, prompts: Sequence[tuple[int, str]], accelerators: int) -> list[int]:
    """Nanoseconds per decision + release: by session key (consistent_hash) or without (p2c)."""
    samples = []
    with _fleet(strategy, accelerators) as router:
        for session, _text in prompts:
            key = session if strategy == "consistent_hash" else None
            samples.append(_timed(lambda: router.acquire(1, affinity_key=key).release()))  # type: ignore[union-attr]  # noqa: B023
    return samples


def _row(name: str, samples_ns: list[int]) -> list[str]:
    return [name, *(f"{quantile(samples_ns, q) / 1000:.2f}" for q in (0.5, 0.99))]


def bench_affinity_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="irmiddleware bench-affinity", description=__doc__)
    parser.add_argument("--sessions", type=int, default=1_000, help="sessions (default 1000)")
    parser.add_argument("--prompt-chars", type=int, default=16_000, help="longest prompt (default 16000)")
    parser.add_argument("--accelerators", type=int, default=64, help="fleet size (default 64)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    prompts = chat_prompts(args.sessions, args.prompt_chars, args.seed)
    longest = prompts[-1][1]
    print(
        f"{len(prompts)} prompts from {args.sessions} sessions, last turns {len(longest):,} characters "
        f"({len(prefix_hashes(longest))} blocks of 64 bytes), {args.accelerators} accelerators"
    )
    prefix = measure_prefix(prompts, args.accelerators)
    ttft = measure_prefix(prompts, args.accelerators, "least_ttft")
    rows = [
        _row("prefix_affinity: hashing", prefix["hashing"]),
        _row("prefix_affinity: decision + release", prefix["decision+release"]),
        _row("prefix_affinity: hash + decide + release", prefix["total"]),
        _row("least_ttft: decision + release", ttft["decision+release"]),
        _row("least_ttft: hash + decide + release", ttft["total"]),
        _row(
            "consistent_hash: decision + release",
            measure_plain("consistent_hash", prompts, args.accelerators),
        ),
        _row("p2c (baseline): decision + release", measure_plain("p2c", prompts, args.accelerators)),
    ]
    print("\n" + format_table(["per decision, µs", "median", "p99"], rows))
    print(f"\ngoal: prefix_affinity and least_ttft hash + decide + release under {_GOAL_US:g} µs")
    return 0
