"""Assemble: system prompt + retrieved context + the session's earlier turns + the user
prompt + the tool calls and results that followed it (a client continuing after its tools ran)."""

from __future__ import annotations

from dataclasses import replace

from pipeline.config import AssembleConfig
from pipeline.stages.context import StageContext
from pipeline.types import AssembledPrompt, ChatMessage


def render_context(ctx: StageContext, config: AssembleConfig) -> str:
    return "\n\n".join(config.document_template.format(title=d.title, body=d.body) for d in ctx.documents)


def assemble(ctx: StageContext, *, config: AssembleConfig) -> StageContext:
    system = config.system_prompt
    if ctx.documents:
        block = config.context_template.format(context=render_context(ctx, config))
        system = f"{system}\n\n{block}" if system else block
    messages: list[ChatMessage] = [ChatMessage("system", system)] if system else []
    if ctx.request.history:
        messages.extend(ctx.history)  # the conversation the client sent, whole: it chose what to send
    elif config.history_turns:
        messages.extend(ctx.history[-2 * config.history_turns :])
    messages.append(ChatMessage("user", ctx.request.prompt))
    messages.extend(ctx.request.tool_turns)
    request = ctx.request
    prompt = AssembledPrompt(
        messages=tuple(messages),
        model=request.model,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        stop=request.stop,
        request_id=request.request_id,
        seed=request.seed,
        options=request.options,
    )
    return replace(ctx, prompt=prompt)
