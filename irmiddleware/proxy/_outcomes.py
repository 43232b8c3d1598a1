"""How a request ends, and how one attempt on a backend ends: the `outcome` label of
`irm_requests_total`, what outlier detection counts against a backend, and what admission and the
middleware answer with. One `Literal` type, so a misspelt outcome is a type error, not a silent
miscount."""

from __future__ import annotations

import typing
from typing import Final, Literal

__all__ = ["OUTCOMES", "AttemptOutcome", "Outcome"]

Outcome = Literal[
    "ok",  # the backend's whole answer reached the client, status < 400
    "backend_error",  # the backend's whole answer reached the client, status >= 400
    "connect_error",  # no backend could be reached (after retries): 502
    "upstream_error",  # the backend broke the connection or answered garbage: 502 or a cut body
    "timeout",  # the backend was too slow: 504 or a cut body
    "client_disconnected",  # the client went away before the end
    "no_capacity",  # saturation: every backend up for the model is full (after waiting, if allowed): 503
    "no_healthy_backend",  # an outage: no backend serving the model is up (unhealthy, ejected, drained): 503
    "rejected",  # the router refused the request itself: 400, 404, 413
    "over_limit",  # a tenant over its rate or concurrency limit: 429 (doc/admission.md)
    "cancelled",  # the server cancelled the request (shutdown)
    "internal",  # a bug or a plugin exception: 500
]
"""How a request ends; every request ends with exactly one, counted in `irm_requests_total`."""

OUTCOMES: Final[tuple[Outcome, ...]] = typing.get_args(Outcome)
"""The values of `Outcome`, in order (the label values of `irm_requests_total{outcome}`)."""

AttemptOutcome = Literal[Outcome, "overloaded"]
"""How one attempt on one backend ends: an `Outcome`, or "overloaded" (the backend answered an
overload status and the request was retried elsewhere). A request never ends "overloaded": the
retry's outcome, or `no_capacity` when none could take it, is the request's."""
