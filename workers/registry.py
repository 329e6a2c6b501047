"""Worker kinds by name: the only place that knows which class serves which kind."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from orchestrator_site.errors import ConfigInvalid
from workers.anthropic import AnthropicWorker
from workers.base import StreamingModelWorker, WorkerSettings
from workers.echo import EchoWorker
from workers.llamacpp import LlamaCppWorker
from workers.openai import OpenAIWorker
from workers.vllm import VllmWorker

WORKER_KINDS: dict[str, Callable[[WorkerSettings], StreamingModelWorker]] = {
    "echo": EchoWorker,
    "openai": OpenAIWorker,
    "anthropic": AnthropicWorker,
    "llamacpp": LlamaCppWorker,
    "vllm": VllmWorker,
}


def refused(kind: str, asked: Iterable[str]) -> list[str]:
    """The optional fields among ``asked`` that a worker of ``kind`` cannot honour (each
    class's ``accepts`` says what it can), sorted."""
    accepts: frozenset[str] = getattr(WORKER_KINDS.get(kind), "accepts", frozenset())
    return sorted(set(asked) - accepts)


def build_worker(settings: WorkerSettings) -> StreamingModelWorker:
    factory = WORKER_KINDS.get(settings.kind)
    if factory is None:
        raise ConfigInvalid(f"worker {settings.name!r} has unknown kind {settings.kind!r}", data={"kinds": sorted(WORKER_KINDS)})
    return factory(settings)
