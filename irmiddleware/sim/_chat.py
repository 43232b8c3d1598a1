"""Multi-turn chat with a shared system prompt, and the prefix cache each accelerator keeps.

A *session* is one conversation: turn k's prompt is the system prompt, every earlier user message
and answer, and the new user message. Prompts are split into blocks of `block_tokens` tokens with
chained hashes (block j's hash covers every token before its end, as vLLM's prefix cache does); the
same hashes go to the router (`prefix_hashes=`) and to the accelerator's cache, so the router's
prefix index and the caches it tries to follow speak of the same blocks.

Token content is not simulated, only its identity: a block wholly inside the system prompt is the
same in every session that shares that system prompt; any later block belongs to its session (the
conversation up to its end is that session's alone).

Each accelerator's cache is a `PrefixCache` (`irmiddleware._prefix_cache`, the one the vLLM
emulator keeps too): an LRU of block hashes holding `cache_blocks_per_slot` blocks per batch slot
(more memory, more batch, more cache). A request reuses the longest run of its prompt's blocks,
from the first, that the cache holds; prefill work is charged for the rest only. Its prompt blocks
are cached when it starts, and the blocks of its answer when it ends (the next turn's prompt starts
with them). Blocks of running requests are not pinned: at the sizes used here an LRU evicts them
only when the cache is far too small anyway.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import NamedTuple

from irmiddleware.sim._model import Fleet, Job, _lognormal_tokens

_MASK = 2**64 - 1
# Sessions drawn to estimate the mean work of a session (fixed seed, like `mean_work_s`).
_MEAN_SESSIONS = 4_000


def _mix(value: int) -> int:
    """SplitMix64's finaliser: a cheap, well-spread 64-bit hash of an int."""
    value = (value + 0x9E37_79B9_7F4A_7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58_476D_1CE4_E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D0_49BB_1331_11EB) & _MASK
    return value ^ (value >> 31)


class Turn(NamedTuple):
    """One request of a session: its prompt and answer lengths (tokens), and how long the user
    thinks after the answer before sending the next turn."""

    prompt_tokens: int
    output_tokens: int
    think_s: float


@dataclass(frozen=True, slots=True)
class ChatWorkload:
    """Sessions of `turns_min`..`turns_max` turns (uniform) over one of `system_prompts` shared
    system prompts of `system_tokens` tokens; user messages and answers log-normal around their
    medians; think time exponential with mean `think_s`. A session ends early when its next prompt
    would exceed `context_tokens`. Work per token as in `LlmWorkload`."""

    system_tokens: int = 1_024
    system_prompts: int = 1
    turns_min: int = 2
    turns_max: int = 8
    user_median: float = 120
    user_sigma: float = 0.8
    output_median: float = 160
    output_sigma: float = 0.8
    think_s: float = 10.0
    context_tokens: int = 8_192
    block_tokens: int = 16
    cache_blocks_per_slot: int = 256
    prefill_s_per_token: float = 0.00025
    decode_s_per_token: float = 0.02
    cost: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.turns_min <= self.turns_max:
            raise ValueError("need 1 <= turns_min <= turns_max")
        if self.system_prompts < 1 or self.block_tokens < 1 or self.cache_blocks_per_slot < 0:
            raise ValueError("system_prompts and block_tokens must be >= 1, cache_blocks_per_slot >= 0")
        if self.system_tokens < 0 or self.think_s < 0 or self.context_tokens <= self.system_tokens:
            raise ValueError("need system_tokens >= 0, think_s >= 0 and context_tokens > system_tokens")

    @property
    def name(self) -> str:
        return "chat"

    @property
    def streams_tokens(self) -> bool:
        return True

    def draw(self, rng: random.Random, prompt_tokens: int | None, output_tokens: int | None) -> Job:
        """A first turn with nothing cached (the `Workload` view, e.g. for `mean_work_s`)."""
        turn = self.session(rng).turns[0]
        return self.job(turn.prompt_tokens, turn.output_tokens, cached_tokens=0)

    def job(self, prompt_tokens: int, output_tokens: int, cached_tokens: int) -> Job:
        """The work of a turn whose first `cached_tokens` prompt tokens are in the cache. At least
        one token is always computed (the server needs the last token's logits)."""
        computed = max(1, prompt_tokens - cached_tokens)
        prefill = computed * self.prefill_s_per_token
        return Job(prompt_tokens, output_tokens, prefill, output_tokens * self.decode_s_per_token, self.cost)

    def session(self, rng: random.Random) -> SessionPlan:
        """Draws a whole session up front, so every strategy replays the same conversations."""
        system = rng.randrange(self.system_prompts)
        turns: list[Turn] = []
        context = self.system_tokens
        for _ in range(rng.randint(self.turns_min, self.turns_max)):
            user = _lognormal_tokens(rng, self.user_median, self.user_sigma, self.context_tokens)
            output = _lognormal_tokens(rng, self.output_median, self.output_sigma, self.context_tokens)
            if context + user + output > self.context_tokens:
                break
            turns.append(
                Turn(context + user, output, rng.expovariate(1 / self.think_s) if self.think_s else 0.0)
            )
            context += user + output
        if not turns:  # Even a first turn would overflow: send a clipped one rather than nothing.
            turns.append(Turn(self.context_tokens - 1, 1, 0.0))
        return SessionPlan(system, tuple(turns))

    def cache_blocks(self, capacity: int) -> int:
        return self.cache_blocks_per_slot * capacity


class SessionPlan(NamedTuple):
    system_prompt: int
    turns: tuple[Turn, ...]


class Conversation:
    """A session's chained block hashes, extended as the conversation grows."""

    __slots__ = ("hashes", "number", "plan", "system_blocks", "turn")

    def __init__(self, number: int, plan: SessionPlan, workload: ChatWorkload) -> None:
        self.number = number
        self.plan = plan
        self.turn = 0
        self.system_blocks = workload.system_tokens // workload.block_tokens
        self.hashes: list[int] = []

    def blocks(self, tokens: int, block_tokens: int) -> list[int]:
        """Hashes of the full blocks of the first `tokens` tokens of the conversation."""
        wanted = tokens // block_tokens
        hashes = self.hashes
        previous = hashes[-1] if hashes else 0
        for index in range(len(hashes), wanted):
            # Inside the system prompt the content is the system prompt's; past it, the session's.
            owner = self.plan.system_prompt if index < self.system_blocks else (1 << 32) + self.number
            previous = _mix(previous ^ _mix((owner << 20) | index))
            hashes.append(previous)
        return hashes[:wanted]


@functools.lru_cache(maxsize=64)
def mean_session_work_s(workload: ChatWorkload) -> float:
    """Mean work of a session with nothing cached (Monte Carlo with a fixed seed, so the same for
    equal workloads: computed once per workload, since the 4,000 sessions take ~0.3 s)."""
    rng = random.Random("mean-session-work")
    total = 0.0
    for _ in range(_MEAN_SESSIONS):
        for turn in workload.session(rng).turns:
            job = workload.job(turn.prompt_tokens, turn.output_tokens, cached_tokens=0)
            total += job.prefill_s + job.decode_s
    return total / _MEAN_SESSIONS


def session_rate(fleet: Fleet, workload: ChatWorkload, load: float) -> float:
    """New sessions per second that keep the fleet `load` busy if nothing were cached (caching
    makes prefill cheaper, so the fleet is somewhat less busy than `load`)."""
    if load <= 0:
        raise ValueError("load must be > 0")
    return load * fleet.peak_throughput() / mean_session_work_s(workload)


def chat_requests_max(workload: ChatWorkload, sessions: int) -> int:
    """An upper bound on the requests `sessions` sessions can send."""
    return sessions * workload.turns_max
