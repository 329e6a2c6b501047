"""Request and result types of the real-time path (frozen, JSON round-trip).

``AssembledPrompt``, ``Completion``, ``TokenChunk``, ``ChatMessage`` and ``Usage``
live in ``workers.types`` (workers know nothing of the pipeline) and are
re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from workers.types import AssembledPrompt, ChatMessage, Completion, GenerationOptions, Leg, TokenChunk, ToolCall, Usage

__all__ = [
    "AssembledPrompt",
    "ChatMessage",
    "Completion",
    "GenerationOptions",
    "Leg",
    "PipelineResult",
    "PromptRequest",
    "TokenChunk",
    "ToolCall",
    "Usage",
]

STAGES = ("rag", "assemble", "inference", "post", "stream")


class DedupMode(StrEnum):
    """How a request shares answers with identical ones (docs/api.md, "Deduplication")."""

    FULL = "full"  # joins one in flight, and is served a finished answer from the window
    IN_FLIGHT = "in_flight"  # joins one in flight only: a sampled answer is not served twice
    OFF = "off"  # neither: the client asked for a fresh answer


@dataclass(frozen=True)
class PromptRequest:
    request_id: str
    tenant_id: str
    session_id: str
    prompt: str
    worker: str
    model: str
    max_tokens: int
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    # The conversation before ``prompt`` when the client sends it (the OpenAI-style
    # API); empty: the session's stored turns are used instead.
    history: tuple[ChatMessage, ...] = ()
    # False: the tenant had no documents when the request started; its search is skipped.
    tenant_has_documents: bool = True
    # False: its client waits for the whole answer; the run publishes the answer once,
    # not token by token.
    stream: bool = True
    # The stored config version the gateway ran when the request started: the run
    # finishes on it, though the worker may have moved on (pipeline.config.config_at).
    config_version: int = 0
    dedup: DedupMode = DedupMode.FULL
    seed: int | None = None
    options: GenerationOptions = field(default_factory=GenerationOptions)
    # What came after ``prompt`` in the client's conversation: the assistant's tool
    # calls and their results, which the model continues from.
    tool_turns: tuple[ChatMessage, ...] = ()
    # The API key it came with (its budget applies); None: no key (a batch item, a test).
    api_key_id: int | None = None
    # How a route group chose its worker ({group, worker, model, reason}); None: it named one.
    route: Mapping[str, str] | None = None

    @property
    def names_session(self) -> bool:
        """False when the client named no session: the request's own id stands in for
        one (new, and no client could have known it)."""
        return self.session_id != self.request_id

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "tenant_id": self.tenant_id,
            "session_id": self.session_id,
            "prompt": self.prompt,
            "worker": self.worker,
            "model": self.model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stop": list(self.stop),
            "metadata": dict(self.metadata),
            "history": [m.to_dict() for m in self.history],
            "tool_turns": [m.to_dict() for m in self.tool_turns],
            "tenant_has_documents": self.tenant_has_documents,
            "config_version": self.config_version,
            "dedup": self.dedup.value,
            "seed": self.seed,
            "options": self.options.to_dict(),
            "stream": self.stream,
            "api_key_id": self.api_key_id,
            "route": dict(self.route) if self.route else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromptRequest:
        temperature = data.get("temperature")
        return cls(
            request_id=str(data["request_id"]),
            tenant_id=str(data["tenant_id"]),
            session_id=str(data["session_id"]),
            prompt=str(data["prompt"]),
            worker=str(data["worker"]),
            model=str(data["model"]),
            max_tokens=int(data["max_tokens"]),
            temperature=None if temperature is None else float(temperature),
            stop=tuple(str(s) for s in data.get("stop") or ()),
            metadata=dict(data.get("metadata") or {}),
            history=tuple(ChatMessage.from_dict(m) for m in data.get("history") or ()),
            tool_turns=tuple(ChatMessage.from_dict(m) for m in data.get("tool_turns") or ()),
            tenant_has_documents=bool(data.get("tenant_has_documents", True)),
            stream=bool(data.get("stream", True)),
            config_version=int(data.get("config_version") or 0),
            dedup=DedupMode(data.get("dedup") or DedupMode.FULL),
            seed=None if data.get("seed") is None else int(data["seed"]),
            options=GenerationOptions.from_dict(data.get("options") or {}),
            api_key_id=None if data.get("api_key_id") is None else int(data["api_key_id"]),
            route={str(k): str(v) for k, v in data["route"].items()} if isinstance(data.get("route"), Mapping) else None,
        )


@dataclass(frozen=True)
class Source:
    """A document a RAG answer used: its id, title, place (1: the best match) and search score."""

    id: str
    title: str
    rank: int
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "rank": self.rank, "score": self.score}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Source:
        return cls(id=str(data["id"]), title=str(data["title"]), rank=int(data["rank"]), score=float(data.get("score", 0.0)))


@dataclass(frozen=True)
class PipelineResult:
    """What ``POST /api/v1/infer`` returns when a request completes."""

    request_id: str
    session_id: str
    text: str
    worker: str
    model: str
    finish_reason: str
    usage: Usage
    timings_us: Mapping[str, int]
    status: str = "completed"
    sources: tuple[Source, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[Mapping[str, Any], ...] | None = None  # OpenAI's ``logprobs.content``, when asked for
    # Each provider's part when the answer failed over mid-stream (``pipeline.failover``):
    # ``worker`` and ``model`` are the last one's, ``usage`` their sum.
    legs: tuple[Leg, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "request_id": self.request_id,
            "session_id": self.session_id,
            "status": self.status,
            "text": self.text,
            "worker": self.worker,
            "model": self.model,
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_dict(),
            "timings_us": dict(self.timings_us),
            "sources": [source.to_dict() for source in self.sources],
            "tool_calls": [call.to_dict() for call in self.tool_calls],
            "logprobs": None if self.logprobs is None else list(self.logprobs),
        }
        if self.legs:  # only an answer that failed over has them
            body["legs"] = [leg.to_dict() for leg in self.legs]
        return body

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PipelineResult:
        return cls(
            request_id=str(data["request_id"]),
            session_id=str(data["session_id"]),
            text=str(data["text"]),
            worker=str(data["worker"]),
            model=str(data["model"]),
            finish_reason=str(data.get("finish_reason", "stop")),
            usage=Usage.from_dict(data.get("usage") or {}),
            timings_us={str(k): int(v) for k, v in (data.get("timings_us") or {}).items()},
            status=str(data.get("status", "completed")),
            sources=tuple(Source.from_dict(d) for d in data.get("sources") or ()),
            tool_calls=tuple(ToolCall.from_dict(call) for call in data.get("tool_calls") or ()),
            logprobs=None if data.get("logprobs") is None else tuple(data["logprobs"]),
            legs=tuple(Leg.from_dict(leg) for leg in data.get("legs") or ()),
        )
