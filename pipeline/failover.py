"""Mid-stream failover: an answer whose provider fails after its first tokens goes
on on a fallback, which continues the answer so far, so that the client reads one
answer with no text missing or repeated at the seam.

The streamed pass (``stages.streamed``) decides when: the provider's error is
transient, text has come from it, no tool call has begun, and the deadline has not
passed. The service (``services.failover``) decides where: the next candidate of the
request's route group, else the worker's ``fallback``, passing over a worker that
cannot continue a partial answer, one whose circuit is open, and one already tried.
The fallback gets the same prompt with the answer so far as its ``prefix`` (the
assistant's last, open, turn) and ``max_tokens`` less what was written.

Each provider's part is a ``Leg`` of the answer with its own usage, priced at its
own worker's prices; the answer's usage is their sum.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from workers.base import StreamingModelWorker
from workers.types import AssembledPrompt, Leg, Usage


@dataclass(frozen=True)
class Next:
    """Where the answer goes on: the worker, and the prompt it continues."""

    worker: StreamingModelWorker
    prompt: AssembledPrompt


class Failover(Protocol):
    def __call__(self, legs: tuple[Leg, ...], prompt: AssembledPrompt) -> Next | None:
        """Where the answer goes on after ``legs`` (the last one failed), with ``prompt``
        (``continuation``) on the chosen worker's model; None when nowhere."""
        ...


def continuation(prompt: AssembledPrompt, answer_so_far: str, *, written_tokens: int) -> AssembledPrompt:
    """``prompt`` (the answer's first) continued after ``answer_so_far``, of which
    ``written_tokens`` tokens count against its ``max_tokens``."""
    return replace(prompt, prefix=answer_so_far, max_tokens=max(1, prompt.max_tokens - written_tokens))


def total_usage(legs: tuple[Leg, ...]) -> Usage:
    total = Usage()
    for leg in legs:
        total += leg.usage
    return total
