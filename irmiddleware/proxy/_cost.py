"""What a request costs in the core's books: 1 (`[router] cost = "requests"`, the default), or an
estimate of the work it brings (`cost = "tokens"`): its prompt's tokens plus its expected output
tokens, with capacities in tokens (`[router.tokens]`).

The prompt's size is estimated from its characters (`chars_per_token`), the whole request body's
when the adapter gives no prompt text. The expected output is the request's own limit
(`max_tokens`, `max_completion_tokens`, TGI's `max_new_tokens`) when it sets one, else the
average length of the answers learned speed has seen stream by (when it is on), else
`output_default`. The part of the prompt the chosen backend has cached is taken off in the core
at the moment of the decision (`Router(discount_cached=True)`): only the core knows which backend
it picks, and the lease gives back exactly what was reserved.
"""

from __future__ import annotations

import math
import re
from typing import Final

from irmiddleware.proxy.config import RouterConfig

__all__ = ["RequestCost"]

# The output limit, as a top-level or nested JSON key; not one inside a string (`\"max_tokens\"`).
_LIMIT: Final = re.compile(rb'(?<!\\)"(?:max_tokens|max_completion_tokens|max_new_tokens)"\s*:\s*(\d{1,9})')


class RequestCost:
    """A request's cost (module docstring); one per router."""

    def __init__(self, config: RouterConfig) -> None:
        self.tokens = config.cost == "tokens"
        tokens = config.tokens
        self._chars_per_token = tokens.chars_per_token
        self._output_default = tokens.output_default
        self._cost_max = tokens.per_slot
        self.output_mean: float | None = None
        """The average streamed answer length seen so far (`observe_output`), if any."""

    @property
    def capacity_scale(self) -> int:
        """Cost units one unit of a backend's configured `capacity` holds."""
        return self._cost_max if self.tokens else 1

    def of(self, prompt: str | None, body: bytes) -> int:
        """The cost of a request with this prompt text (None: not extracted) and body."""
        if not self.tokens:
            return 1
        prompt_tokens = math.ceil(len(prompt if prompt is not None else body) / self._chars_per_token)
        limit = _LIMIT.search(body)
        if limit is not None:
            output = int(limit.group(1))
        elif self.output_mean is not None:
            output = round(self.output_mean)
        else:
            output = self._output_default
        return max(1, min(prompt_tokens + output, self._cost_max))

    def observe_output(self, tokens: int) -> None:
        """An answer streamed `tokens` tokens (learned speed tells): the average moves 5 % of the
        way, so a few odd answers do not swing what an unlimited request is expected to cost."""
        mean = self.output_mean
        self.output_mean = float(tokens) if mean is None else mean + 0.05 * (tokens - mean)

    def block_tokens(self, block_chars: int) -> float:
        """Tokens of one prompt block of `block_chars` characters (least_ttft's price of a block
        with costs in tokens)."""
        return block_chars / self._chars_per_token
