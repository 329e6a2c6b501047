"""The offline worker: echoes the last user message, word by word, deterministically."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from workers.base import SAMPLING, WorkerSettings
from workers.types import AssembledPrompt, Completion, TokenChunk, Usage


def echo_tokens(prompt: AssembledPrompt, token_count: int) -> tuple[list[str], str]:
    """The reply's tokens and finish reason: the last user message's words, cycled to
    ``token_count`` tokens, cut at ``max_tokens`` (finish reason ``length`` then)."""
    user = next((m.content for m in reversed(prompt.messages) if m.role == "user"), "")
    words = user.split() or ["echo"]
    wanted = [words[i % len(words)] for i in range(token_count)]
    if len(wanted) > prompt.max_tokens:
        return [_join(i, w) for i, w in enumerate(wanted[: prompt.max_tokens])], "length"
    return [_join(i, w) for i, w in enumerate(wanted)], "stop"


def _join(i: int, word: str) -> str:
    return word if i == 0 else " " + word


def _prompt_tokens(prompt: AssembledPrompt) -> int:
    return sum(len(m.content.split()) for m in prompt.messages)


class EchoWorker:
    supports_streaming = True
    accepts = SAMPLING  # and ignores them: echo never samples

    def __init__(self, settings: WorkerSettings) -> None:
        self.name = settings.name
        self.settings = settings

    def infer(self, prompt: AssembledPrompt) -> Completion:
        tokens, finish = echo_tokens(prompt, self.settings.token_count)
        if self.settings.token_delay_s:
            time.sleep(self.settings.token_delay_s * len(tokens))
        return Completion(
            text="".join(tokens),
            model=prompt.model,
            worker=self.name,
            finish_reason=finish,
            usage=Usage(_prompt_tokens(prompt), len(tokens)),
        )

    async def infer_stream(self, prompt: AssembledPrompt) -> AsyncIterator[TokenChunk]:
        tokens, finish = echo_tokens(prompt, self.settings.token_count)
        for index, token in enumerate(tokens):
            if self.settings.token_delay_s:
                await asyncio.sleep(self.settings.token_delay_s)
            yield TokenChunk(index=index, text=token)
        yield TokenChunk(index=len(tokens), text="", finish_reason=finish, usage=Usage(_prompt_tokens(prompt), len(tokens)))
