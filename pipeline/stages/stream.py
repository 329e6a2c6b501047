"""Stream: hands the output to the token bus, chunk by chunk, with sequence numbers."""

from __future__ import annotations

from typing import Protocol

from pipeline.stages.context import StageContext
from pipeline.types import TokenChunk


class Publisher(Protocol):
    def __call__(self, chunk: TokenChunk) -> None: ...


def stream(ctx: StageContext, *, publish: Publisher) -> StageContext:
    calls = tuple(call.delta(place) for place, call in enumerate(ctx.completion.tool_calls)) if ctx.completion else ()
    if ctx.output or calls:
        publish(TokenChunk(index=0, text=ctx.output, tool_calls=calls))
    return ctx
