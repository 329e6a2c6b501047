"""The worker contracts the pipeline depends on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from workers.types import AssembledPrompt, Completion, TokenChunk


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs to run, built by the pipeline from ``pipeline.toml``."""

    name: str
    kind: str
    base_url: str = ""
    api_key: str = ""
    models: tuple[str, ...] = ()
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    max_connections: int = 100
    # echo only
    token_count: int = 16
    token_delay_s: float = 0.0
    # llamacpp only: how chat messages become one prompt string
    prompt_format: str = "chatml"
    extra_headers: dict[str, str] = field(default_factory=dict)


# The optional request fields (``GenerationOptions``, and ``seed``) by what they need
# of a provider. A worker class's ``accepts`` names those it can honour (read by
# ``workers.registry.refused``; a class without it honours none); "tools" also admits
# tool calls and tool results in the conversation.
SAMPLING = frozenset({"seed", "top_p", "presence_penalty", "frequency_penalty", "logit_bias", "user"})
TOOLS = frozenset({"tools", "tool_choice", "parallel_tool_calls"})
LOGPROBS = frozenset({"logprobs", "top_logprobs"})
JSON_OUTPUT = frozenset({"response_format"})


@runtime_checkable
class ModelWorker(Protocol):
    name: str
    supports_streaming: bool

    def infer(self, prompt: AssembledPrompt) -> Completion: ...


@runtime_checkable
class StreamingModelWorker(ModelWorker, Protocol):
    def infer_stream(self, prompt: AssembledPrompt) -> AsyncIterator[TokenChunk]: ...
