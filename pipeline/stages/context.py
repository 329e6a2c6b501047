from __future__ import annotations

from dataclasses import dataclass

from orchestrator_site.errors import StageOrderError
from pipeline.types import AssembledPrompt, ChatMessage, Completion, PromptRequest


@dataclass(frozen=True)
class RetrievedDocument:
    id: str
    title: str
    body: str
    rank: float


@dataclass(frozen=True)
class StageContext:
    request: PromptRequest
    documents: tuple[RetrievedDocument, ...] = ()
    rag_outcome: str = "skipped"
    history: tuple[ChatMessage, ...] = ()
    prompt: AssembledPrompt | None = None
    completion: Completion | None = None
    output: str = ""
    finish_reason: str = "stop"
    # Set by a streamed inference (stages.streamed): post-processing and publishing
    # are done, and the time they took inside it.
    streamed: bool = False
    streamed_timings: StreamedTimings | None = None


@dataclass(frozen=True)
class StreamedTimings:
    """Time spent post-processing and publishing inside a streamed inference."""

    post_ns: int = 0
    stream_ns: int = 0


def require_prompt(ctx: StageContext) -> AssembledPrompt:
    if ctx.prompt is None:
        raise StageOrderError("inference ran before assemble")
    return ctx.prompt


def require_completion(ctx: StageContext) -> Completion:
    if ctx.completion is None:
        raise StageOrderError("post-process ran before inference")
    return ctx.completion
