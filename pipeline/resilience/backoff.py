"""Exponential backoff with full jitter, and the provider's Retry-After honoured up to a cap.

delay(attempt) = uniform(0, min(max_s, base_s * 2**attempt)), attempt counted from 0;
a Retry-After from the provider replaces the jitter, capped at retry_after_cap_s.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BackoffPolicy:
    base_s: float = 0.2
    max_s: float = 10.0
    attempts: int = 3  # calls in all, the first one included
    retry_after_cap_s: float = 30.0


def backoff_ceiling(policy: BackoffPolicy, attempt: int) -> float:
    # min() before the power would overflow for large attempts; the exponent is bounded instead.
    exponent = min(attempt, 64)  # pragma: no mutate  (equivalent: base_s * 2**64 is past any max_s; the bound keeps the power finite)
    return min(policy.max_s, policy.base_s * (2.0**exponent))


def retry_delay(policy: BackoffPolicy, attempt: int, *, retry_after: float | None, rng: random.Random) -> float | None:
    """Seconds to wait before call ``attempt + 1``, or None when no call is left."""
    if attempt + 1 >= policy.attempts:
        return None
    if retry_after is not None:
        return min(max(retry_after, 0.0), policy.retry_after_cap_s)
    return rng.uniform(0.0, backoff_ceiling(policy, attempt))
