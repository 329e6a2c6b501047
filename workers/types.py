"""Frozen value types shared by the workers and the pipeline; each round-trips through JSON."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    """A function the model asks its caller to run, in OpenAI's terms whatever the provider."""

    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def delta(self, index: int) -> dict[str, Any]:
        """The whole call as one stream delta, at ``index`` among the reply's calls."""
        return {"index": index, **self.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToolCall:
        function = data["function"]
        return cls(id=str(data["id"]), name=str(function["name"]), arguments=str(function.get("arguments") or ""))


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's: the functions it asked for
    tool_call_id: str = ""  # a tool's: the call whose result it carries

    @property
    def is_tool_turn(self) -> bool:
        return bool(self.tool_calls) or self.role == "tool"

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's message shape (an assistant's content is null when it only called tools)."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["content"] = self.content or None
            message["tool_calls"] = [call.to_dict() for call in self.tool_calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | Iterable[Any]) -> ChatMessage:
        """From ``to_dict``, or a ``[role, content]`` pair (records of earlier versions)."""
        if not isinstance(data, Mapping):
            role, content = data
            return cls(role=str(role), content=str(content))
        return cls(
            role=str(data["role"]),
            content=str(data.get("content") or ""),
            tool_calls=tuple(ToolCall.from_dict(call) for call in data.get("tool_calls") or ()),
            tool_call_id=str(data.get("tool_call_id") or ""),
        )


@dataclass(frozen=True)
class GenerationOptions:
    """OpenAI's optional request fields, in OpenAI's shapes. A worker sends on the ones
    its provider honours (translated where its API differs); the gateway refuses a
    request that sets one its worker cannot honour (each worker class's ``accepts``)."""

    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: Mapping[str, float] | None = None  # token id (as text) -> bias
    logprobs: bool | None = None
    top_logprobs: int | None = None
    user: str | None = None
    tools: tuple[Mapping[str, Any], ...] = ()  # {"type": "function", "function": {name, description, parameters}}
    tool_choice: str | Mapping[str, Any] | None = None  # "none" | "auto" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool | None = None
    response_format: Mapping[str, Any] | None = None  # {"type": "json_object"} | {"type": "json_schema", ...}

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set, by OpenAI's names (what the request asked for)."""
        given = {f.name: getattr(self, f.name) for f in fields(self)}
        given["tools"] = list(self.tools)
        if self.response_format is not None and self.response_format.get("type") == "text":
            given["response_format"] = None  # the default: asks for nothing
        return {name: value for name, value in given.items() if value is not None and value != []}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationOptions:
        known = {f.name for f in fields(cls)}
        given = {name: value for name, value in data.items() if name in known and value is not None}
        if "tools" in given:
            given["tools"] = tuple(given["tools"])
        return cls(**given)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)

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
    options: GenerationOptions = field(default_factory=GenerationOptions)
    # The answer so far, for the model to continue (a failover, ``pipeline.failover``):
    # the last, assistant, turn, which the reply goes on from without repeating it.
    prefix: str = ""

    @property
    def turns(self) -> tuple[ChatMessage, ...]:
        """The messages, then the answer so far as the last, assistant, turn when there is one."""
        return (*self.messages, ChatMessage("assistant", self.prefix)) if self.prefix else self.messages

    def to_dict(self) -> dict[str, Any]:
        return {
            "messages": [m.to_dict() for m in self.messages],
            "model": self.model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stop": list(self.stop),
            "request_id": self.request_id,
            "seed": self.seed,
            "options": self.options.to_dict(),
            "prefix": self.prefix,
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
            options=GenerationOptions.from_dict(data.get("options") or {}),
            prefix=str(data.get("prefix") or ""),
        )


@dataclass(frozen=True)
class Leg:
    """One provider's part of an answer that failed over (``pipeline.failover``): the
    worker and model, its usage, and the error it ended with ("" for the last)."""

    worker: str
    model: str
    usage: Usage
    # The provider's stream ended before it said its usage: bounded from the bytes
    # sent and received, as a budget reserves (never less than it billed).
    estimated: bool = False
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"worker": self.worker, "model": self.model, "usage": self.usage.to_dict(), "estimated": self.estimated, "error": self.error or None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Leg:
        return cls(
            worker=str(data["worker"]),
            model=str(data["model"]),
            usage=Usage.from_dict(dict(data.get("usage") or {})),
            estimated=bool(data.get("estimated")),
            error=str(data.get("error") or ""),
        )


@dataclass(frozen=True)
class Completion:
    text: str
    model: str
    worker: str
    finish_reason: str = "stop"  # "stop" | "length" | "tool_calls"
    usage: Usage = field(default_factory=Usage)
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[Mapping[str, Any], ...] | None = None  # OpenAI's ``logprobs.content``, when asked for
    # Each provider's part, when the answer failed over (``usage`` is their sum); () when one answered.
    legs: tuple[Leg, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "model": self.model,
            "worker": self.worker,
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_dict(),
            "tool_calls": [call.to_dict() for call in self.tool_calls],
            "logprobs": None if self.logprobs is None else list(self.logprobs),
            "legs": [leg.to_dict() for leg in self.legs],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Completion:
        logprobs = data.get("logprobs")
        return cls(
            text=str(data["text"]),
            model=str(data["model"]),
            worker=str(data["worker"]),
            finish_reason=str(data.get("finish_reason", "stop")),
            usage=Usage.from_dict(data.get("usage") or {}),
            tool_calls=tuple(ToolCall.from_dict(call) for call in data.get("tool_calls") or ()),
            logprobs=None if logprobs is None else tuple(logprobs),
            legs=tuple(Leg.from_dict(leg) for leg in data.get("legs") or ()),
        )


@dataclass(frozen=True)
class TokenChunk:
    """One piece of a streamed completion. The last chunk has ``finish_reason`` and ``usage``.

    ``tool_calls`` are OpenAI's deltas of the calls being written (``index``, then
    ``id``, ``type`` and the function's ``name`` once, its ``arguments`` in pieces);
    ``logprobs`` OpenAI's entries for this piece's tokens."""

    index: int
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    tool_calls: tuple[Mapping[str, Any], ...] = ()
    logprobs: tuple[Mapping[str, Any], ...] = ()
    # Not text: a marker that the answer goes on on another worker ({from, to, model, error}),
    # published by the pipeline between two providers' pieces (``stages.streamed``).
    failover: Mapping[str, Any] | None = None

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": None if self.usage is None else self.usage.to_dict(),
            "tool_calls": list(self.tool_calls),
            "logprobs": list(self.logprobs),
            "failover": None if self.failover is None else dict(self.failover),
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
            tool_calls=tuple(data.get("tool_calls") or ()),
            logprobs=tuple(data.get("logprobs") or ()),
            failover=data.get("failover") or None,
        )


class ToolCallBuilder:
    """Whole tool calls from a stream's deltas (``TokenChunk.tool_calls``), by index."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def add(self, deltas: Iterable[Mapping[str, Any]]) -> None:
        for delta in deltas:
            call = self._calls.setdefault(int(delta.get("index", 0)), {"id": "", "name": "", "arguments": ""})
            function = delta.get("function") or {}
            call["id"] = str(delta.get("id") or call["id"])
            call["name"] = str(function.get("name") or call["name"])
            call["arguments"] += str(function.get("arguments") or "")

    def calls(self) -> tuple[ToolCall, ...]:
        return tuple(ToolCall(**self._calls[index]) for index in sorted(self._calls))
