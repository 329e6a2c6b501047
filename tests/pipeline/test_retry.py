"""Transient worker failures are retried with backoff; permanent ones and started streams are not."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from orchestrator_site.errors import TransientWorkerError, WorkerAuthError, WorkerConnectionError, WorkerRateLimited
from pipeline.config import PipelineSettings, RetryConfig, WorkerConfig
from pipeline.resilience.backoff import BackoffPolicy
from pipeline.resilience.retry import RetryingWorker
from pipeline.routing import WorkerPool
from tests.conftest import Fakes, TenantFixture, WorkerProcess
from tests.fakes.openai import FakeOpenAI
from workers.base import WorkerSettings
from workers.openai import OpenAIWorker
from workers.types import AssembledPrompt, ChatMessage, Completion, TokenChunk

PROMPT = AssembledPrompt(messages=(ChatMessage("user", "hi"),), model="m", max_tokens=5)
POLICY = BackoffPolicy(base_s=0.5, max_s=4, attempts=3, retry_after_cap_s=10)


class Scripted:
    """Fails with the given errors in order, then answers."""

    name = "scripted"
    supports_streaming = True

    def __init__(self, *errors: Exception, fail_after_chunks: int = 0) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.fail_after_chunks = fail_after_chunks

    def infer(self, prompt: AssembledPrompt) -> Completion:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return Completion(text="ok", model="m", worker=self.name)

    async def infer_stream(self, prompt: AssembledPrompt) -> AsyncIterator[TokenChunk]:
        self.calls += 1
        for i in range(self.fail_after_chunks):
            yield TokenChunk(index=i, text=f"t{i}")
        if self.errors:
            raise self.errors.pop(0)
        yield TokenChunk(index=self.fail_after_chunks, text="", finish_reason="stop")


def retrying(inner: Scripted, sleeps: list[float]) -> RetryingWorker:
    async def asleep(delay: float) -> None:
        sleeps.append(delay)

    return RetryingWorker(inner, POLICY, sleep=sleeps.append, asleep=asleep, rng=random.Random(1))


def test_transient_errors_are_retried_until_success() -> None:
    sleeps: list[float] = []
    inner = Scripted(TransientWorkerError(), WorkerConnectionError())
    assert retrying(inner, sleeps).infer(PROMPT).text == "ok"
    assert inner.calls == 3 and len(sleeps) == 2
    assert 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 1.0  # full jitter under the doubling ceiling


def test_retry_after_is_honoured_and_capped() -> None:
    sleeps: list[float] = []
    inner = Scripted(WorkerRateLimited(retry_after=2.5), WorkerRateLimited(retry_after=99))
    retrying(inner, sleeps).infer(PROMPT)
    assert sleeps == [2.5, 10]


def test_attempts_run_out_with_the_last_error() -> None:
    sleeps: list[float] = []
    last = WorkerRateLimited("third", retry_after=1)
    inner = Scripted(TransientWorkerError(), TransientWorkerError(), last)
    with pytest.raises(WorkerRateLimited) as info:
        retrying(inner, sleeps).infer(PROMPT)
    assert info.value is last and inner.calls == 3 and len(sleeps) == 2


def test_permanent_errors_are_not_retried() -> None:
    sleeps: list[float] = []
    inner = Scripted(WorkerAuthError())
    with pytest.raises(WorkerAuthError):
        retrying(inner, sleeps).infer(PROMPT)
    assert inner.calls == 1 and sleeps == []


def collect(worker: RetryingWorker) -> list[TokenChunk]:
    async def run() -> list[TokenChunk]:
        return [c async for c in worker.infer_stream(PROMPT)]

    return asyncio.run(run())


def test_a_stream_failing_before_its_first_chunk_is_retried() -> None:
    sleeps: list[float] = []
    inner = Scripted(WorkerConnectionError())
    chunks = collect(retrying(inner, sleeps))
    assert inner.calls == 2 and len(sleeps) == 1 and chunks[-1].finish_reason == "stop"


def test_closing_the_stream_closes_the_inner_one_at_once() -> None:
    closed: list[str] = []

    class Upstream(Scripted):
        async def infer_stream(self, prompt: AssembledPrompt) -> AsyncIterator[TokenChunk]:
            try:
                for i in range(100):
                    yield TokenChunk(index=i, text=f"t{i}")
            finally:
                closed.append("upstream call ended")

    async def read_one_then_leave() -> list[str]:
        stream = retrying(Upstream(), []).infer_stream(PROMPT)
        await anext(stream)  # type: ignore[call-overload]
        await stream.aclose()  # type: ignore[attr-defined]
        return list(closed)  # before the loop could collect anything

    assert asyncio.run(read_one_then_leave()) == ["upstream call ended"]


def test_a_stream_that_has_sent_a_token_is_never_retried() -> None:
    sleeps: list[float] = []
    inner = Scripted(WorkerConnectionError(), fail_after_chunks=1)
    seen: list[str] = []

    async def run() -> None:
        async for chunk in retrying(inner, sleeps).infer_stream(PROMPT):
            seen.append(chunk.text)

    with pytest.raises(WorkerConnectionError):
        asyncio.run(run())
    assert seen == ["t0"] and inner.calls == 1 and sleeps == []


def test_the_pool_wraps_http_workers_but_not_echo_or_single_attempts() -> None:
    config = PipelineSettings(
        workers={
            "echo": WorkerConfig(kind="echo"),
            "o": WorkerConfig(kind="openai", base_url="http://127.0.0.1:1", retry=RetryConfig(attempts=4, base_ms=10, max_ms=100)),
            "once": WorkerConfig(kind="openai", base_url="http://127.0.0.1:1", retry=RetryConfig(attempts=1)),
        }
    )
    pool = WorkerPool()
    wrapped = pool.get(config, "o")
    assert isinstance(wrapped, RetryingWorker) and wrapped.policy == BackoffPolicy(base_s=0.01, max_s=0.1, attempts=4, retry_after_cap_s=30.0)
    assert not isinstance(pool.get(config, "echo"), RetryingWorker)
    assert isinstance(pool.get(config, "once"), OpenAIWorker)


def test_against_the_fake_a_503_storm_then_recovery() -> None:
    fake = FakeOpenAI().start()
    try:
        fake.fail_times, fake.fail_mode, fake.retry_after = 2, "503", "0"
        worker = RetryingWorker(
            OpenAIWorker(WorkerSettings(name="o", kind="openai", base_url=fake.url + "/v1")), BackoffPolicy(base_s=0.001, max_s=0.01, attempts=3)
        )
        assert worker.infer(PROMPT).text == "Hello, world!"
        assert len(fake.requests) == 3
        fake.tokens = []  # so that the drop comes before any token
        fake.fail_times, fake.fail_mode = 1, "drop"
        before = len(fake.requests)
        chunks = collect(worker)
        assert chunks[-1].finish_reason == "stop" and len(fake.requests) == before + 2  # dropped, then retried
    finally:
        fake.stop()


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_through_the_pipeline_a_retried_request_succeeds(owner: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes) -> None:
    fakes.openai.fail_times, fakes.openai.fail_mode, fakes.openai.retry_after = 2, "429", "0"
    resp = owner.client.post("/api/v1/infer", {"prompt": "hi", "worker": "openai_retry"}, format="json")
    assert resp.status_code == 200 and resp.json()["text"] == "Hello, world!"
    assert len(fakes.openai.requests) >= 3


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_through_the_pipeline_retries_run_out(owner: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes) -> None:
    fakes.openai.fail_times, fakes.openai.fail_mode, fakes.openai.retry_after = 5, "503", "0"
    resp = owner.client.post("/api/v1/infer", {"prompt": "hi", "worker": "openai_retry"}, format="json")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "worker_unavailable"
    assert fakes.openai.fail_times == 2  # three calls were made, no more


def test_each_retry_is_logged_and_counted_under_the_workers_name() -> None:
    """The log line an operator reads for a retry, field by field, and the retries
    histogram per worker: the calls a request needed, for a whole reply and a stream."""
    from prometheus_client import REGISTRY
    from structlog.testing import capture_logs

    def observed() -> tuple[float, float]:
        labels = {"worker": "scripted"}
        return (
            REGISTRY.get_sample_value("orchestrator_worker_retries_count", labels) or 0.0,
            REGISTRY.get_sample_value("orchestrator_worker_retries_sum", labels) or 0.0,
        )

    sleeps: list[float] = []
    worker = retrying(Scripted(WorkerRateLimited(retry_after=1.23456)), sleeps)
    assert (worker.name, worker.supports_streaming) == ("scripted", True)  # the inner worker's, passed through
    before = observed()
    with capture_logs() as logs:
        worker.infer(PROMPT)
    assert [e for e in logs if e["event"] == "worker_retry"] == [
        {
            "event": "worker_retry",
            "log_level": "warning",
            "worker": "scripted",
            "attempt": 1,
            "delay_s": 1.235,
            "error_code": "worker_rate_limited",
            "outcome": "retry",
        }
    ]
    after = observed()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)  # one call, one retry

    async def drain(w: RetryingWorker) -> list[TokenChunk]:
        return [c async for c in w.infer_stream(PROMPT)]

    streamed = retrying(Scripted(TransientWorkerError(), TransientWorkerError()), sleeps)
    with capture_logs() as logs:
        chunks = asyncio.run(drain(streamed))
    assert chunks[-1].finish_reason == "stop" and [e["attempt"] for e in logs if e["event"] == "worker_retry"] == [1, 2]
    final = observed()
    assert (final[0] - after[0], final[1] - after[1]) == (1, 2)  # one stream, two retries
