"""What each recording site puts in the metrics, read back from this process's values:
the stream clock, the retry histogram on every way a call can end, the stage and
worker histograms on success and failure."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace

import pytest
from prometheus_client import REGISTRY

from orchestrator_site.errors import WorkerAuthError, WorkerConnectionError, WorkerTimeout
from pipeline import metrics
from pipeline.config import PipelineSettings
from pipeline.engine import PipelineDeps, run_pipeline
from pipeline.stages.rag import RetrievalResult
from pipeline.types import PromptRequest
from tests.pipeline.test_retry import PROMPT, Scripted, retrying
from workers.base import WorkerSettings
from workers.echo import EchoWorker
from workers.types import AssembledPrompt, Completion


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Delta:
    """Samples before and after a block."""

    def __init__(self, *series: tuple[str, dict[str, str]]) -> None:
        self.series = series
        self.before = [sample(name, **labels) for name, labels in series]

    def __call__(self) -> list[float]:
        return [sample(name, **labels) - b for (name, labels), b in zip(self.series, self.before, strict=True)]


def test_the_first_token_sets_ttft_once_and_every_token_is_counted() -> None:
    delta = Delta(("orchestrator_ttft_seconds_count", {"worker": "w1"}), ("orchestrator_stream_tokens_total", {"worker": "w1"}))
    clock = metrics.StreamClock("w1", accepted_at=time.time() - 0.25)
    for _ in range(3):
        clock.token()
    assert delta() == [1, 3] and clock.tokens == 3
    assert sample("orchestrator_ttft_seconds_sum", worker="w1") >= 0.25


def test_without_an_acceptance_time_there_is_no_ttft() -> None:
    delta = Delta(("orchestrator_ttft_seconds_count", {"worker": "w2"}), ("orchestrator_stream_tokens_total", {"worker": "w2"}))
    clock = metrics.StreamClock("w2", accepted_at=None)
    clock.token()
    assert delta() == [0, 1]


def test_a_clock_ahead_of_the_worker_never_gives_a_negative_ttft() -> None:
    delta = Delta(("orchestrator_ttft_seconds_sum", {"worker": "w3"}), ("orchestrator_ttft_seconds_count", {"worker": "w3"}))
    metrics.StreamClock("w3", accepted_at=time.time() + 60).token()  # the gateway's clock runs ahead
    assert delta() == [0.0, 1]


def test_the_end_counts_the_outcome_and_times_only_streams_that_started() -> None:
    delta = Delta(
        ("orchestrator_pipeline_requests_total", {"worker": "w4", "outcome": "ok"}),
        ("orchestrator_pipeline_requests_total", {"worker": "w4", "outcome": "worker_timeout"}),
        ("orchestrator_stream_duration_seconds_count", {"worker": "w4", "outcome": "ok"}),
        ("orchestrator_stream_duration_seconds_count", {"worker": "w4", "outcome": "worker_timeout"}),
    )
    metrics.StreamClock("w4", accepted_at=None).finished("worker_timeout")  # failed before any token
    streamed = metrics.StreamClock("w4", accepted_at=None)
    streamed.token()
    streamed.finished("ok")
    assert delta() == [1, 1, 1, 0]


@pytest.mark.parametrize(("raw", "parsed"), [(None, None), ("", None), ("soon", None), ("1700000000.5", 1700000000.5)])
def test_acceptance_times_are_parsed_leniently(raw: str | None, parsed: float | None) -> None:
    assert metrics.parse_time(raw) == parsed


def retries(worker: str = "scripted") -> Delta:
    return Delta(("orchestrator_worker_retries_count", {"worker": worker}), ("orchestrator_worker_retries_sum", {"worker": worker}))


@pytest.mark.parametrize(
    ("errors", "expected"),
    [
        ((), [1, 0]),  # answered at once: one call, no retry
        ((WorkerConnectionError(), WorkerConnectionError()), [1, 2]),  # answered on the third attempt
        ((WorkerConnectionError(),) * 3, [1, 2]),  # gave up after the policy's three attempts
        ((WorkerAuthError(),), [1, 0]),  # permanent: no retry, still one call counted
    ],
)
def test_every_call_observes_its_retries_once(errors: tuple[Exception, ...], expected: list[float]) -> None:
    delta = retries()
    worker = retrying(Scripted(*errors), [])
    with contextlib.suppress(WorkerConnectionError, WorkerAuthError):
        worker.infer(PROMPT)
    assert delta() == expected


def test_streams_observe_their_retries_however_they_end() -> None:
    async def drain(worker: object, stop_after: int | None = None) -> None:
        stream = worker.infer_stream(PROMPT)  # type: ignore[attr-defined]
        seen = 0
        try:
            async for _ in stream:
                seen += 1
                if stop_after is not None and seen >= stop_after:
                    break  # the reader left
        finally:
            await stream.aclose()

    delta = retries()
    asyncio.run(drain(retrying(Scripted(WorkerConnectionError()), [])))  # retried once, then streamed
    assert delta() == [1, 1]
    delta = retries()
    asyncio.run(drain(retrying(Scripted(WorkerConnectionError(), fail_after_chunks=3), []), stop_after=1))
    assert delta() == [1, 0]  # closed by its reader after the first chunk
    delta = retries()
    with pytest.raises(WorkerConnectionError):
        asyncio.run(drain(retrying(Scripted(WorkerConnectionError(), fail_after_chunks=1), [])))
    assert delta() == [1, 0]  # failed after a chunk: not retried


class TimesOut:
    name = "slow"
    supports_streaming = False

    def infer(self, prompt: AssembledPrompt) -> Completion:
        raise WorkerTimeout()


def deps(worker: object) -> PipelineDeps:
    return PipelineDeps(
        config=PipelineSettings(),
        retrieve=lambda **_: RetrievalResult(documents=(), timed_out=False),
        load_history=lambda: (),
        worker=worker,
        publish=lambda chunk: None,
    )  # type: ignore[arg-type]


REQUEST = PromptRequest(request_id="r-m", tenant_id="t", session_id="s", prompt="hello metrics", worker="echo", model="echo-1", max_tokens=8)


def test_each_stage_is_timed_and_recorded_when_the_request_ends() -> None:
    stages = ("assemble", "inference", "post", "stream")
    delta = Delta(
        *[("orchestrator_stage_duration_seconds_count", {"stage": s, "outcome": "ok"}) for s in stages],
        ("orchestrator_worker_latency_seconds_count", {"worker": "echo", "outcome": "ok"}),
    )
    clock = metrics.StreamClock("echo", accepted_at=None)
    _, result = run_pipeline(REQUEST, deps(EchoWorker(WorkerSettings(name="echo", kind="echo"))), clock.stages)
    assert [stage for stage, _, _ in clock.stages] == ["rag", *stages]
    assert all(ns >= 0 for _, _, ns in clock.stages) and clock.stages[0][1] == _rag_outcome()
    assert delta() == [0, 0, 0, 0, 0]  # nothing is recorded while the request runs
    clock.finished("ok")
    assert delta() == [1, 1, 1, 1, 1]
    assert result.usage.total_tokens > 0
    run_pipeline(REQUEST, deps(EchoWorker(WorkerSettings(name="echo", kind="echo"))))  # observing is optional


def _rag_outcome() -> str:
    from pipeline.stages.context import StageContext
    from pipeline.stages.rag import rag

    return rag(StageContext(request=REQUEST), retrieve=lambda **_: RetrievalResult(documents=(), timed_out=False), config=PipelineSettings().rag).rag_outcome


def test_a_failing_stage_is_timed_under_its_error_code() -> None:
    request = replace(REQUEST, worker="slow")
    delta = Delta(
        ("orchestrator_stage_duration_seconds_count", {"stage": "inference", "outcome": "worker_timeout"}),
        ("orchestrator_worker_latency_seconds_count", {"worker": "slow", "outcome": "worker_timeout"}),
        ("orchestrator_stage_duration_seconds_count", {"stage": "post", "outcome": "ok"}),
    )
    clock = metrics.StreamClock("slow", accepted_at=None)
    with pytest.raises(WorkerTimeout):
        run_pipeline(request, deps(TimesOut()), clock.stages)
    assert [(stage, outcome) for stage, outcome, _ in clock.stages][-1] == ("inference", "worker_timeout")
    clock.finished("worker_timeout")
    assert delta() == [1, 1, 0]  # the stages after it never ran


def test_label_children_are_cached() -> None:
    assert metrics.child(metrics.TTFT, "cached") is metrics.child(metrics.TTFT, "cached")
    assert metrics.child(metrics.TTFT, "cached") is not metrics.child(metrics.TTFT, "other")


def test_cached_children_of_different_metrics_never_collide() -> None:
    shed, limited = metrics.child(metrics.REQUESTS_SHED, "tenant"), metrics.child(metrics.RATE_LIMITED, "tenant")
    assert shed is not limited
    before = sample("orchestrator_requests_shed_total", scope="tenant")
    shed.inc()
    assert sample("orchestrator_requests_shed_total", scope="tenant") == before + 1
