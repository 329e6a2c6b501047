"""Frozen value types shared by the workers and the pipeline; each round-trips through JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatMessage:
        return cls(role=str(data["role"]), content=str(data["content"]))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": self.total_tokens}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Usage:
        return cls(prompt_tokens=int(data.get("prompt_tokens", 0)), completion_tokens=int(data.get("completion_tokens", 0)))


@dataclass(frozen=True)
class AssembledPrompt:
    """What a worker receives: chat messages plus generation parameters."""

    messages: tuple[ChatMessage, ...]
    model: str
    max_tokens: int
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    request_id: str = ""
    seed: int | None = None  # sampled the same way each time, where the provider honours it

    def to_dict(self) -> dict[str, Any]:
        return {
            "messages": [m.to_dict() for m in self.messages],
            "model": self.model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stop": list(self.stop),
            "request_id": self.request_id,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AssembledPrompt:
        temperature = data.get("temperature")
        return cls(
            messages=tuple(ChatMessage.from_dict(m) for m in data["messages"]),
            model=str(data["model"]),
            max_tokens=int(data["max_tokens"]),
            temperature=None if temperature is None else float(temperature),
            stop=tuple(str(s) for s in data.get("stop", ())),
            request_id=str(data.get("request_id", "")),
            seed=None if data.get("seed") is None else int(data["seed"]),
        )


@dataclass(frozen=True)
class Completion:
    text: str
    model: str
    worker: str
    finish_reason: str = "stop"  # "stop" | "length" | "error"
    usage: Usage = field(default_factory=Usage)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["usage"] = self.usage.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Completion:
        return cls(
            text=str(data["text"]),
            model=str(data["model"]),
            worker=str(data["worker"]),
            finish_reason=str(data.get("finish_reason", "stop")),
            usage=Usage.from_dict(data.get("usage") or {}),
        )


@dataclass(frozen=True)
class TokenChunk:
    """One piece of a streamed completion. The last chunk has ``finish_reason`` and ``usage``."""

    index: int
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": None if self.usage is None else self.usage.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenChunk:
        usage = data.get("usage")
        finish = data.get("finish_reason")
        return cls(
            index=int(data["index"]),
            text=str(data["text"]),
            finish_reason=None if finish is None else str(finish),
            usage=None if usage is None else Usage.from_dict(usage),
        )
