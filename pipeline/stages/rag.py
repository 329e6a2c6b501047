"""RAG: the tenant's most relevant documents, within a context-size limit."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

from pipeline.config import RagConfig
from pipeline.stages.context import RetrievedDocument, StageContext
from pipeline.types import PromptRequest


@dataclass(frozen=True)
class RetrievalResult:
    documents: tuple[RetrievedDocument, ...]
    timed_out: bool = False


class Retriever(Protocol):
    def __call__(self, *, tenant_id: str, query: str, top_k: int, timeout_ms: int, text_search_config: str) -> RetrievalResult: ...


def limit_context(documents: tuple[RetrievedDocument, ...], max_chars: int) -> tuple[RetrievedDocument, ...]:
    """Keep documents in rank order until ``max_chars`` of title + body; cut the last one short."""
    kept: list[RetrievedDocument] = []
    budget = max_chars
    for doc in documents:
        size = len(doc.title) + len(doc.body)
        if size <= budget:
            kept.append(doc)
            budget -= size
            continue
        room = budget - len(doc.title)
        if room > 0:
            kept.append(replace(doc, body=doc.body[:room]))
        break
    return tuple(kept)


def search_args(request: PromptRequest, config: RagConfig) -> dict[str, Any]:
    """What the stage asks its retriever for a request."""
    return {
        "tenant_id": request.tenant_id,
        "query": request.prompt,
        "top_k": config.top_k,
        "timeout_ms": config.timeout_ms,
        "text_search_config": config.text_search_config,
    }


def rag(ctx: StageContext, *, retrieve: Retriever, config: RagConfig) -> StageContext:
    if not config.enabled:
        return replace(ctx, rag_outcome="disabled")
    if not ctx.request.tenant_has_documents:
        return replace(ctx, rag_outcome="no_documents")  # its search would find nothing
    result = retrieve(**search_args(ctx.request, config))
    documents = limit_context(result.documents, config.max_context_chars)
    # A slow search degrades the answer (no context), never the request.
    outcome = "timeout" if result.timed_out else ("hit" if documents else "miss")
    return replace(ctx, documents=documents, rag_outcome=outcome)
