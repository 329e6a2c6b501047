"""The offline worker: echoes the last user message, word by word, deterministically."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from workers.base import SAMPLING, WorkerSettings
from workers.types import AssembledPrompt, Completion, TokenChunk, Usage


def echo_tokens(prompt: AssembledPrompt, token_count: int) -> tuple[list[str], str]:
    """The reply's tokens and finish reason: the last user message's words, cycled to
    ``token_count`` tokens, cut at ``max_tokens`` (finish reason ``length`` then). With
    a prefix (a failover), what follows it: echo continues its own answer exactly."""
    user = next((m.content for m in reversed(prompt.messages) if m.role == "user"), "")
    words = user.split() or ["echo"]
    wanted = continued([_join(i, words[i % len(words)]) for i in range(token_count)], prompt.prefix)
    if len(wanted) > prompt.max_tokens:
        return wanted[: prompt.max_tokens], "length"
    return wanted, "stop"


def continued(tokens: list[str], prefix: str) -> list[str]:
    """The tokens of an answer after ``prefix``, its first part (the rest of a token it
    ends inside, then the tokens after it); all of them when it is not their beginning."""
    answer = "".join(tokens)
    if not prefix or not answer.startswith(prefix):
        return tokens
    written = 0
    for place, token in enumerate(tokens):
        if written + len(token) > len(prefix):
            rest = token[len(prefix) - written :]
            return [rest, *tokens[place + 1 :]]
        written += len(token)
    return []


def _join(i: int, word: str) -> str:
    return word if i == 0 else " " + word


def _prompt_tokens(prompt: AssembledPrompt) -> int:
    return sum(len(m.content.split()) for m in prompt.turns)


class EchoWorker:
    supports_streaming = True
    continues_prefix = True
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
