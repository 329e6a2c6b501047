"""The five stages as plain functions over frozen contexts (no database, no Redis)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from orchestrator_site.errors import StageOrderError
from pipeline.config import AssembleConfig, PostprocessConfig, RagConfig
from pipeline.stages.assemble import assemble
from pipeline.stages.context import RetrievedDocument, StageContext
from pipeline.stages.inference import inference
from pipeline.stages.postprocess import postprocess
from pipeline.stages.rag import RetrievalResult, limit_context, rag
from pipeline.stages.stream import stream
from pipeline.types import ChatMessage, Completion, PromptRequest, TokenChunk, Usage
from workers.base import WorkerSettings
from workers.echo import EchoWorker

REQUEST = PromptRequest(
    request_id="r1",
    tenant_id="t1",
    session_id="s1",
    prompt="what is the refund policy",
    worker="echo",
    model="echo-1",
    max_tokens=50,
    temperature=0.3,
    stop=("##",),
)
DOCS = (RetrievedDocument("d1", "Refunds", "Refunds within 30 days.", 0.9), RetrievedDocument("d2", "Shipping", "Ships in 2 days.", 0.4))


class Recorder:
    def __init__(self, result: RetrievalResult) -> None:
        self.result = result
        self.calls: list[dict[str, object]] = []

    def __call__(self, *, tenant_id: str, query: str, top_k: int, timeout_ms: int, text_search_config: str) -> RetrievalResult:
        self.calls.append({"tenant_id": tenant_id, "query": query, "top_k": top_k, "timeout_ms": timeout_ms, "cfg": text_search_config})
        return self.result


# --- rag ------------------------------------------------------------------------
def test_rag_passes_tenant_query_and_limits() -> None:
    retriever = Recorder(RetrievalResult(DOCS))
    ctx = rag(StageContext(REQUEST), retrieve=retriever, config=RagConfig(top_k=2, timeout_ms=99))
    assert retriever.calls == [{"tenant_id": "t1", "query": REQUEST.prompt, "top_k": 2, "timeout_ms": 99, "cfg": "english"}]
    assert ctx.documents == DOCS and ctx.rag_outcome == "hit"


def test_rag_disabled_never_calls_the_retriever() -> None:
    retriever = Recorder(RetrievalResult(DOCS))
    ctx = rag(StageContext(REQUEST), retrieve=retriever, config=RagConfig(enabled=False))
    assert retriever.calls == [] and ctx.documents == () and ctx.rag_outcome == "disabled"


def test_rag_miss_and_timeout_outcomes() -> None:
    assert rag(StageContext(REQUEST), retrieve=Recorder(RetrievalResult(())), config=RagConfig()).rag_outcome == "miss"
    timed_out = rag(StageContext(REQUEST), retrieve=Recorder(RetrievalResult((), timed_out=True)), config=RagConfig())
    assert timed_out.rag_outcome == "timeout" and timed_out.documents == ()


def test_limit_context_keeps_rank_order_and_cuts_the_last() -> None:
    assert limit_context(DOCS, 10_000) == DOCS
    cut = limit_context(DOCS, len("Refunds") + len("Refunds within 30 days.") + len("Shipping") + 3)
    assert [d.id for d in cut] == ["d1", "d2"] and cut[1].body == "Shi"
    assert limit_context(DOCS, 0) == ()
    assert limit_context(DOCS, 5) == ()  # not even the first title fits


# --- assemble -------------------------------------------------------------------------
def test_assemble_orders_system_context_history_and_user() -> None:
    history = (ChatMessage("user", "hi"), ChatMessage("assistant", "hello"))
    ctx = assemble(StageContext(REQUEST, documents=DOCS, history=history), config=AssembleConfig(system_prompt="SYS"))
    prompt = ctx.prompt
    assert prompt is not None
    roles = [m.role for m in prompt.messages]
    assert roles == ["system", "user", "assistant", "user"]
    system = prompt.messages[0].content
    assert system.startswith("SYS\n\n") and "[Refunds]\nRefunds within 30 days." in system and system.index("Refunds") < system.index("Shipping")
    assert prompt.messages[-1].content == REQUEST.prompt
    assert (prompt.model, prompt.max_tokens, prompt.temperature, prompt.stop, prompt.request_id) == ("echo-1", 50, 0.3, ("##",), "r1")


def test_assemble_templates_are_configurable() -> None:
    config = AssembleConfig(system_prompt="", context_template="CTX<{context}>", document_template="{title}:{body}")
    prompt = assemble(StageContext(REQUEST, documents=DOCS[:1]), config=config).prompt
    assert prompt is not None and prompt.messages[0].content == "CTX<Refunds:Refunds within 30 days.>"


def test_assemble_without_system_or_context() -> None:
    prompt = assemble(StageContext(REQUEST), config=AssembleConfig(system_prompt="")).prompt
    assert prompt is not None and [m.role for m in prompt.messages] == ["user"]


def test_assemble_keeps_only_the_latest_turns() -> None:
    history = tuple(ChatMessage("user" if i % 2 == 0 else "assistant", str(i)) for i in range(10))
    prompt = assemble(StageContext(REQUEST, history=history), config=AssembleConfig(history_turns=2)).prompt
    assert prompt is not None and [m.content for m in prompt.messages[1:-1]] == ["6", "7", "8", "9"]
    none = assemble(StageContext(REQUEST, history=history), config=AssembleConfig(history_turns=0)).prompt
    assert none is not None and len(none.messages) == 2


def test_document_text_with_braces_is_inserted_verbatim() -> None:
    docs = (RetrievedDocument("d", "{title}", "{body} {0}", 1.0),)
    prompt = assemble(StageContext(REQUEST, documents=docs), config=AssembleConfig()).prompt
    assert prompt is not None and "[{title}]\n{body} {0}" in prompt.messages[0].content


# --- inference --------------------------------------------------------------------------
def test_inference_calls_the_worker_with_the_assembled_prompt() -> None:
    ctx = assemble(StageContext(REQUEST), config=AssembleConfig())
    out = inference(ctx, worker=EchoWorker(WorkerSettings(name="echo", kind="echo", token_count=3)))
    assert out.completion is not None and out.completion.text == "what is the" and out.finish_reason == "stop"


def test_inference_before_assemble_is_a_stage_order_error() -> None:
    with pytest.raises(StageOrderError):
        inference(StageContext(REQUEST), worker=EchoWorker(WorkerSettings(name="echo", kind="echo")))


# --- post-process --------------------------------------------------------------------------
def post(text: str, config: PostprocessConfig | None = None, stop: tuple[str, ...] = ()) -> StageContext:
    ctx = StageContext(replace(REQUEST, stop=stop), completion=Completion(text=text, model="m", worker="w", finish_reason="length", usage=Usage(1, 2)))
    return postprocess(ctx, config=config or PostprocessConfig())


def test_post_applies_request_and_config_stops() -> None:
    out = post("alpha beta ## gamma", stop=("##",))
    assert out.output == "alpha beta" and out.finish_reason == "stop"
    out = post("one END two", PostprocessConfig(stop=("END",)))
    assert out.output == "one"


def test_post_keeps_the_workers_finish_reason_without_a_stop() -> None:
    assert post("plain").finish_reason == "length"


def test_post_redacts_emails_and_keys() -> None:
    out = post("mail bob.smith+x@example.co.uk or use sk-abcdefghijklmnop1234 and AKIAABCDEFGHIJKLMNOP").output
    assert "example" not in out and "sk-abc" not in out and "AKIA" not in out
    assert out.count("[REDACTED]") == 3


def test_post_redaction_can_be_switched_off_and_extended() -> None:
    config = PostprocessConfig(
        redact_emails=False, redact_api_keys=False, patterns=({"name": "ssn", "pattern": r"\d{3}-\d{2}-\d{4}", "max_length": 11},), replacement="***"
    )  # type: ignore[arg-type]
    assert post("a@b.io 123-45-6789", config).output == "a@b.io ***"


def test_post_trims_unless_told_not_to() -> None:
    assert post("  \n hi there \n ").output == "hi there"
    assert post("  hi  ", PostprocessConfig(trim=False)).output == "  hi  "


def test_post_before_inference_is_a_stage_order_error() -> None:
    with pytest.raises(StageOrderError):
        postprocess(StageContext(REQUEST), config=PostprocessConfig())


# --- stream ------------------------------------------------------------------------------
def test_stream_publishes_the_output() -> None:
    published: list[TokenChunk] = []
    ctx = stream(StageContext(REQUEST, output="hello"), publish=published.append)
    assert published == [TokenChunk(index=0, text="hello")] and ctx.output == "hello"
    stream(StageContext(REQUEST, output=""), publish=published.append)
    assert len(published) == 1  # nothing to publish for an empty reply
