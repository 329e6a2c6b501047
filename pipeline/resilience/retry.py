"""Retries of transient worker failures, with full-jitter backoff and the provider's Retry-After.

Only ``TransientWorkerError``s are retried (rate limits, 5xx, timeouts, dropped
connections); a permanent error (bad credentials, malformed body, 4xx) fails at
once. A stream is retried only before its first chunk: once a token has reached
a client, a retry would send the reply twice, so the error ends the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import cast

import structlog

from orchestrator_site.errors import TransientWorkerError
from pipeline import metrics
from pipeline.resilience.backoff import BackoffPolicy, retry_delay
from workers.base import StreamingModelWorker
from workers.types import AssembledPrompt, Completion, TokenChunk

log = structlog.get_logger("pipeline.retry")


class RetryingWorker:
    def __init__(
        self,
        inner: StreamingModelWorker,
        policy: BackoffPolicy,
        *,
        sleep: Callable[[float], None] = time.sleep,
        asleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.inner = inner
        self.policy = policy
        self.name = inner.name
        self.supports_streaming = inner.supports_streaming
        self.continues_prefix = bool(getattr(inner, "continues_prefix", False))  # a failover may go on on it (pipeline.failover)
        self._sleep = sleep
        self._asleep = asleep
        self._rng = rng or random.Random()

    def _next_delay(self, attempt: int, exc: TransientWorkerError) -> float | None:
        delay = retry_delay(self.policy, attempt, retry_after=exc.retry_after, rng=self._rng)
        if delay is not None:
            log.warning("worker_retry", worker=self.name, attempt=attempt + 1, delay_s=round(delay, 3), error_code=exc.code, outcome="retry")
        return delay

    def _retried(self, attempt: int) -> None:
        metrics.child(metrics.WORKER_RETRIES, self.name).observe(attempt)

    def infer(self, prompt: AssembledPrompt) -> Completion:
        attempt = 0
        try:
            while True:
                try:
                    return self.inner.infer(prompt)
                except TransientWorkerError as exc:
                    delay = self._next_delay(attempt, exc)
                    if delay is None:
                        raise
                self._sleep(delay)
                attempt += 1
        finally:
            self._retried(attempt)

    async def infer_stream(self, prompt: AssembledPrompt) -> AsyncIterator[TokenChunk]:
        attempt = 0
        try:
            while True:
                started = False  # pragma: no mutate  (equivalent: None is as false)
                try:
                    # aclosing: closing this stream (its reader left) closes the inner one,
                    # and with it the upstream call, now. A generator iterated inside
                    # another is otherwise closed only when collected, on its loop's
                    # next turn: a worker thread's loop idles until its next task, and
                    # meanwhile the provider kept writing the whole reply.
                    stream = cast(AsyncGenerator[TokenChunk, None], self.inner.infer_stream(prompt))  # pragma: no mutate  (cast: nothing at run time)
                    async with contextlib.aclosing(stream) as chunks:
                        async for chunk in chunks:
                            started = True
                            yield chunk
                    return
                except TransientWorkerError as exc:
                    if started:
                        raise  # a token has reached the client: never replay the reply
                    delay = self._next_delay(attempt, exc)
                    if delay is None:
                        raise
                await self._asleep(delay)
                attempt += 1
        finally:
            self._retried(attempt)  # however the call ended: answered, failed, or closed by its reader
