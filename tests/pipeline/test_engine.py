"""The engine runs the five stages in order, times each and logs each."""

from __future__ import annotations

import pytest
import structlog
from structlog.testing import capture_logs

from orchestrator_site.errors import WorkerRateLimited
from pipeline.config import PipelineSettings, RagConfig
from pipeline.engine import STAGE_TABLE, PipelineDeps, run_pipeline
from pipeline.stages.context import RetrievedDocument
from pipeline.stages.rag import RetrievalResult
from pipeline.types import STAGES, AssembledPrompt, ChatMessage, Completion, PromptRequest, TokenChunk, Usage

REQUEST = PromptRequest(request_id="r1", tenant_id="t1", session_id="s1", prompt="tell me about refunds", worker="w", model="m", max_tokens=20)


class ScriptedWorker:
    name = "w"
    supports_streaming = False

    def __init__(self, text: str = "Refunds take 30 days. Mail help@shop.test", error: Exception | None = None) -> None:
        self.text, self.error = text, error
        self.prompts: list[AssembledPrompt] = []

    def infer(self, prompt: AssembledPrompt) -> Completion:
        self.prompts.append(prompt)
        if self.error:
            raise self.error
        return Completion(text=self.text, model="m-served", worker="w", usage=Usage(11, 7))


def retriever(**_: object) -> RetrievalResult:
    return RetrievalResult((RetrievedDocument("d", "Refund policy", "30 days", 1.0),))


def deps(worker: ScriptedWorker, published: list[TokenChunk], config: PipelineSettings | None = None) -> PipelineDeps:
    return PipelineDeps(
        config=config or PipelineSettings(),
        retrieve=retriever,
        load_history=lambda: (ChatMessage("user", "earlier"), ChatMessage("assistant", "reply")),
        worker=worker,
        publish=published.append,
    )


def test_stage_table_is_the_five_stages_in_order() -> None:
    assert tuple(name for name, _ in STAGE_TABLE) == STAGES == ("rag", "assemble", "inference", "post", "stream")


def test_run_gives_the_result_with_five_timings() -> None:
    published: list[TokenChunk] = []
    worker = ScriptedWorker()
    ctx, result = run_pipeline(REQUEST, deps(worker, published))
    assert list(result.timings_us) == list(STAGES) and all(v >= 0 for v in result.timings_us.values())
    assert result.text == "Refunds take 30 days. Mail [REDACTED]"
    assert result.model == "m-served" and result.usage == Usage(11, 7) and result.worker == "w"
    assert [c.text for c in published] == [result.text]
    sent = worker.prompts[0]
    assert "Refund policy" in sent.messages[0].content
    assert [m.content for m in sent.messages[1:]] == ["earlier", "reply", "tell me about refunds"]
    assert ctx.rag_outcome == "hit"


def test_each_stage_is_logged_with_the_schema_fields() -> None:
    with capture_logs() as logs:
        run_pipeline(REQUEST, deps(ScriptedWorker(), []))
    stages = [e for e in logs if e["event"] == "stage"]
    assert [e["stage"] for e in stages] == list(STAGES)
    for event in stages:
        assert {"stage", "session_id", "request_id", "duration_us", "outcome"} <= set(event)
        assert event["request_id"] == "r1" and event["session_id"] == "s1"
    assert stages[0]["outcome"] == "hit"
    assert all("tell me about refunds" not in str(e) for e in logs)  # prompts never reach the log


def test_a_failing_stage_is_logged_and_raised() -> None:
    published: list[TokenChunk] = []
    with capture_logs() as logs, pytest.raises(WorkerRateLimited):
        run_pipeline(REQUEST, deps(ScriptedWorker(error=WorkerRateLimited(retry_after=3)), published))
    failed = [e for e in logs if e.get("outcome") == "error"]
    assert failed[0]["stage"] == "inference" and failed[0]["error_code"] == "worker_rate_limited"
    assert published == []  # nothing streamed after a failure


def test_rag_disabled_is_reported() -> None:
    config = PipelineSettings(rag=RagConfig(enabled=False))
    ctx, _ = run_pipeline(REQUEST, deps(ScriptedWorker(), [], config))
    assert ctx.rag_outcome == "disabled" and ctx.documents == ()


def test_structlog_is_configured_for_the_suite() -> None:
    assert structlog.is_configured()


def test_history_is_loaded_once_inside_assemble() -> None:
    calls: list[int] = []

    def load() -> tuple[ChatMessage, ...]:
        calls.append(1)
        return ()

    base = deps(ScriptedWorker(), [])
    run_pipeline(REQUEST, PipelineDeps(config=base.config, retrieve=base.retrieve, load_history=load, worker=base.worker, publish=base.publish))
    assert calls == [1]


def test_a_failing_publisher_fails_the_stream_stage() -> None:
    from orchestrator_site.errors import ServiceUnavailable

    def publish(chunk: TokenChunk) -> None:
        raise ServiceUnavailable(data={"service": "redis"})

    base = deps(ScriptedWorker(), [])
    with capture_logs() as logs, pytest.raises(ServiceUnavailable):
        run_pipeline(REQUEST, PipelineDeps(config=base.config, retrieve=base.retrieve, load_history=base.load_history, worker=base.worker, publish=publish))
    assert [e["stage"] for e in logs if e.get("outcome") == "error"] == ["stream"]


def test_an_empty_reply_publishes_nothing_but_still_completes() -> None:
    published: list[TokenChunk] = []
    _, result = run_pipeline(REQUEST, deps(ScriptedWorker(text="   "), published))
    assert result.text == "" and published == [] and list(result.timings_us) == list(STAGES)
