"""The llama.cpp server's native ``POST /completion`` (``stream: true`` over SSE)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from orchestrator_site.errors import WorkerConnectionError, WorkerProtocolError
from workers.base import JSON_OUTPUT, SAMPLING, WorkerSettings
from workers.http import HttpClients, check_response, json_object, translate_errors
from workers.sse import aiter_sse, read_to_end
from workers.types import AssembledPrompt, ChatMessage, Completion, GenerationOptions, TokenChunk, Usage


def render_prompt(messages: tuple[ChatMessage, ...], fmt: str) -> str:
    """Chat messages as one prompt string. ``chatml`` suits SmolLM2, Qwen and most instruct GGUFs."""
    if fmt == "chatml":
        parts = [f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages]
        return "".join(parts) + "<|im_start|>assistant\n"
    return "\n\n".join(f"{m.role}: {m.content}" for m in messages) + "\n\nassistant:"


def native_options(options: GenerationOptions) -> dict[str, Any]:
    """OpenAI's sampling fields and ``response_format`` as ``/completion`` takes them: a
    JSON schema (or, for ``json_object``, any object) constrains the grammar; a logit
    bias is a list of [token id, bias] pairs. ``user`` has no counterpart: it is dropped."""
    body: dict[str, Any] = {}
    for name in ("top_p", "presence_penalty", "frequency_penalty"):
        value = getattr(options, name)
        if value is not None:
            body[name] = value
    if options.logit_bias:
        body["logit_bias"] = [[int(token) if token.isdigit() else token, bias] for token, bias in options.logit_bias.items()]
    wanted = options.response_format or {}
    if wanted.get("type") == "json_schema":
        body["json_schema"] = wanted["json_schema"].get("schema") or {}
    elif wanted.get("type") == "json_object":
        body["json_schema"] = {"type": "object"}
    return body


class LlamaCppWorker:
    supports_streaming = True
    # The native endpoint has no tool calling and no logprobs in OpenAI's shape.
    accepts = SAMPLING | JSON_OUTPUT
    continues_prefix = True
    path = "/completion"

    def __init__(self, settings: WorkerSettings) -> None:
        self.name = settings.name
        self.settings = settings
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._http = HttpClients(settings, headers)

    def body(self, prompt: AssembledPrompt, *, stream: bool) -> dict[str, Any]:
        stop = list(prompt.stop)
        if self.settings.prompt_format == "chatml":
            stop.append("<|im_end|>")
        body: dict[str, Any] = {
            # The answer so far, if any, follows the assistant's open turn: the model continues it.
            "prompt": render_prompt(prompt.messages, self.settings.prompt_format) + prompt.prefix,
            "n_predict": prompt.max_tokens,
            "stream": stream,
            "stop": stop,
            "cache_prompt": True,
        }
        if prompt.temperature is not None:
            body["temperature"] = prompt.temperature
        if prompt.seed is not None:
            body["seed"] = prompt.seed
        body.update(native_options(prompt.options))
        return body

    def infer(self, prompt: AssembledPrompt) -> Completion:
        with translate_errors(self.name):
            response = self._http.post(self.path, json=self.body(prompt, stream=False))
            check_response(self.name, response)
            payload = json_object(self.name, response.content)
            return Completion(
                text=str(payload["content"]),
                model=prompt.model,
                worker=self.name,
                finish_reason=_finish(payload),
                usage=Usage(int(payload.get("tokens_evaluated", 0)), int(payload.get("tokens_predicted", 0))),
            )

    async def infer_stream(self, prompt: AssembledPrompt) -> AsyncIterator[TokenChunk]:
        index = 0
        with translate_errors(self.name):
            async with self._http.stream(self.path, self.body(prompt, stream=True)) as lines:
                events = aiter_sse(lines)
                async for event in events:
                    payload = json_object(self.name, event.data)
                    if "error" in payload:
                        raise WorkerProtocolError(f"{self.name}: error event in stream", data={"worker": self.name, "upstream_message": str(payload["error"])})
                    text = str(payload.get("content") or "")
                    if payload.get("stop"):
                        usage = Usage(int(payload.get("tokens_evaluated", 0)), int(payload.get("tokens_predicted", 0)))
                        yield TokenChunk(index=index, text=text, finish_reason=_finish(payload), usage=usage)
                        await read_to_end(events)  # the connection goes back to the pool
                        return
                    if text:
                        yield TokenChunk(index=index, text=text)
                        index += 1
        raise WorkerConnectionError(f"{self.name}: stream ended before the final event", data={"worker": self.name})


def _finish(payload: dict[str, Any]) -> str:
    return "length" if payload.get("stop_type") == "limit" else "stop"
