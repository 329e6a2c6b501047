"""The engine: runs the five stages in order, timing and logging each one."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import structlog

from orchestrator_site import telemetry
from orchestrator_site.errors import OrchestratorError, WorkerTimeout
from pipeline.config import PipelineSettings
from pipeline.failover import Failover
from pipeline.stages.assemble import assemble
from pipeline.stages.context import StageContext, require_prompt
from pipeline.stages.inference import inference
from pipeline.stages.postprocess import postprocess
from pipeline.stages.rag import Retriever, rag
from pipeline.stages.stream import Publisher, stream
from pipeline.stages.streamed import inference_streamed
from pipeline.types import ChatMessage, PipelineResult, PromptRequest, Source, Usage
from workers.base import ModelWorker, StreamingModelWorker
from workers.types import AssembledPrompt

log = structlog.get_logger("pipeline")


@dataclass(frozen=True)
class PipelineDeps:
    """Everything the stages touch outside themselves, injected (real or fake)."""

    config: PipelineSettings
    retrieve: Retriever
    load_history: Callable[[], tuple[ChatMessage, ...]]
    worker: ModelWorker
    publish: Publisher
    # Stream from the worker, post-processing and publishing chunk by chunk
    # (stages.streamed), when the worker can; otherwise one reply, then post, then publish.
    streaming: bool = False
    # Asked while the upstream is silent: does anyone still read this request's stream?
    still_wanted: Callable[[], bool] | None = None
    # When the request must be answered by (time.time()): the provider call is cancelled then.
    deadline_at: float | None = None
    # Told the assembled prompt before the provider is called; may refuse it by raising
    # (the budget's correction: ``services.budgets``).
    before_inference: Callable[[AssembledPrompt], None] | None = None
    # Where a streamed answer goes on when its provider fails mid-stream (``pipeline.failover``).
    failover: Failover | None = None


Stage = Callable[[StageContext, PipelineDeps], StageContext]


def _assemble(ctx: StageContext, deps: PipelineDeps) -> StageContext:
    # A conversation sent by the client replaces the session's stored turns.
    history = ctx.request.history or deps.load_history()
    return assemble(replace(ctx, history=history), config=deps.config.assemble)


def _inference(ctx: StageContext, deps: PipelineDeps) -> StageContext:
    worker = deps.worker
    if deps.before_inference is not None:
        deps.before_inference(require_prompt(ctx))
    timeout_s = None if deps.deadline_at is None else deps.deadline_at - time.time()
    if timeout_s is not None and timeout_s <= 0:
        raise WorkerTimeout("the request's deadline passed before inference", data={"worker": worker.name})
    if deps.streaming and worker.supports_streaming and isinstance(worker, StreamingModelWorker):
        return inference_streamed(
            ctx,
            worker=worker,
            config=deps.config.postprocess,
            publish=deps.publish,
            still_wanted=deps.still_wanted,
            timeout_s=timeout_s,
            failover=deps.failover,
        )
    return inference(ctx, worker=worker)  # a worker that cannot stream answers within its own timeout


STAGE_TABLE: tuple[tuple[str, Stage], ...] = (
    ("rag", lambda ctx, deps: rag(ctx, retrieve=deps.retrieve, config=deps.config.rag)),
    ("assemble", _assemble),
    ("inference", _inference),
    ("post", lambda ctx, deps: ctx if ctx.streamed else postprocess(ctx, config=deps.config.postprocess)),
    ("stream", lambda ctx, deps: ctx if ctx.streamed else stream(ctx, publish=deps.publish)),
)


StageTiming = tuple[str, str, int]  # stage, outcome, elapsed nanoseconds


def _time_moved_to(ctx: StageContext, stage: str) -> int:
    """A streamed inference post-processes and publishes as it goes: that time is
    the post and stream stages', not the inference's."""
    spent = ctx.streamed_timings
    if spent is None:
        return 0
    return {"inference": -(spent.post_ns + spent.stream_ns), "post": spent.post_ns, "stream": spent.stream_ns}.get(stage, 0)


def run_pipeline(request: PromptRequest, deps: PipelineDeps, observed: list[StageTiming] | None = None) -> tuple[StageContext, PipelineResult]:
    """Run the five stages. Each stage's timing and outcome is appended to ``observed``,
    for the caller to record as metrics once the request is answered (off its latency)."""
    ctx = StageContext(request=request)
    if observed is None:
        observed = []
    timings: dict[str, int] = {}
    bound = log.bind(request_id=request.request_id, session_id=request.session_id, tenant_id=request.tenant_id, worker=request.worker)
    attributes = {"request_id": request.request_id, "worker": request.worker, "model": request.model}
    for name, stage in STAGE_TABLE:
        with telemetry.span(f"pipeline.{name}", attributes):
            started = time.perf_counter_ns()
            try:
                ctx = stage(ctx, deps)
            except OrchestratorError as exc:
                observed.append((name, exc.code, time.perf_counter_ns() - started))
                bound.warning("stage", stage=name, duration_us=(time.perf_counter_ns() - started) // 1000, outcome="error", error_code=exc.code)
                raise
            elapsed = max(0, time.perf_counter_ns() - started + _time_moved_to(ctx, name))
            timings[name] = elapsed // 1000
            outcome = ctx.rag_outcome if name == "rag" else "ok"
            observed.append((name, outcome, elapsed))
            if name == "inference" and ctx.completion:
                telemetry.annotate(tokens=ctx.completion.usage.total_tokens, model=ctx.completion.model)
        bound.info("stage", stage=name, duration_us=timings[name], outcome=outcome)
    completion = ctx.completion
    result = PipelineResult(
        request_id=request.request_id,
        session_id=request.session_id,
        text=ctx.output,
        worker=completion.worker if completion and completion.legs else request.worker,
        model=completion.model if completion else request.model,
        finish_reason=ctx.finish_reason,
        usage=completion.usage if completion else Usage(),
        timings_us=timings,
        sources=tuple(Source(id=d.id, title=d.title, rank=place, score=d.rank) for place, d in enumerate(ctx.documents, start=1)),
        tool_calls=completion.tool_calls if completion else (),
        logprobs=completion.logprobs if completion else None,
        legs=completion.legs if completion else (),
    )
    return ctx, result
