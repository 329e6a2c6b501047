"""OpenAI Chat Completions (``POST /v1/chat/completions``), streaming over SSE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from orchestrator_site.errors import WorkerConnectionError, WorkerProtocolError
from workers.base import JSON_OUTPUT, LOGPROBS, SAMPLING, TOOLS, WorkerSettings
from workers.http import HttpClients, check_response, json_object, translate_errors
from workers.sse import aiter_sse, read_to_end
from workers.types import AssembledPrompt, Completion, TokenChunk, ToolCall, Usage


class OpenAIWorker:
    supports_streaming = True
    # Every optional field goes on unchanged (vLLM's server takes them too).
    accepts = SAMPLING | TOOLS | LOGPROBS | JSON_OUTPUT
    # OpenAI's API has no way to continue a partial answer (an assistant turn last is a
    # turn of the past, answered anew): a failover never continues on it.
    continues_prefix = False
    # OpenAI renamed max_tokens; OpenAI-compatible servers (vLLM) still take the old name.
    max_tokens_field = "max_completion_tokens"
    path = "/chat/completions"

    def __init__(self, settings: WorkerSettings) -> None:
        self.name = settings.name
        self.settings = settings
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._http = HttpClients(settings, headers)

    def body(self, prompt: AssembledPrompt, *, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": prompt.model,
            "messages": [m.to_dict() for m in prompt.turns],
            self.max_tokens_field: prompt.max_tokens,
            "stream": stream,
        }
        if prompt.temperature is not None:
            body["temperature"] = prompt.temperature
        if prompt.seed is not None:
            body["seed"] = prompt.seed
        if prompt.stop:
            body["stop"] = list(prompt.stop)
        if stream:
            body["stream_options"] = {"include_usage": True}
        body.update(prompt.options.to_dict())
        return body

    def infer(self, prompt: AssembledPrompt) -> Completion:
        with translate_errors(self.name):
            response = self._http.post(self.path, json=self.body(prompt, stream=False))
            check_response(self.name, response)
            payload = json_object(self.name, response.content)
            choice = payload["choices"][0]
            usage = payload.get("usage") or {}
            logprobs = choice.get("logprobs")
            return Completion(
                text=str(choice["message"].get("content") or ""),
                model=str(payload.get("model") or prompt.model),
                worker=self.name,
                finish_reason=_finish(choice.get("finish_reason")),
                usage=Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))),
                tool_calls=tuple(ToolCall.from_dict(call) for call in choice["message"].get("tool_calls") or ()),
                logprobs=None if not logprobs else tuple(logprobs.get("content") or ()),
            )

    async def infer_stream(self, prompt: AssembledPrompt) -> AsyncIterator[TokenChunk]:
        index = 0
        finish: str | None = None
        usage: Usage | None = None
        with translate_errors(self.name):
            async with self._http.stream(self.path, self.body(prompt, stream=True)) as lines:
                events = aiter_sse(lines)
                async for event in events:
                    if event.data == "[DONE]":
                        yield TokenChunk(index=index, text="", finish_reason=finish or "stop", usage=usage or Usage())
                        await read_to_end(events)  # the connection goes back to the pool
                        return
                    payload = json_object(self.name, event.data)
                    if "error" in payload:
                        raise WorkerProtocolError(f"{self.name}: error event in stream", data={"worker": self.name, "upstream_message": str(payload["error"])})
                    if payload.get("usage"):
                        u = payload["usage"]
                        usage = Usage(int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0)))
                    for choice in payload.get("choices") or []:
                        delta = choice.get("delta") or {}
                        text = delta.get("content") or ""
                        calls = tuple(delta.get("tool_calls") or ())
                        logprobs = tuple((choice.get("logprobs") or {}).get("content") or ())
                        if choice.get("finish_reason"):
                            finish = _finish(choice["finish_reason"])
                        if text or calls or logprobs:
                            yield TokenChunk(index=index, text=str(text), tool_calls=calls, logprobs=logprobs)
                            index += 1
        # The body ended cleanly but without "data: [DONE]": the stream was cut.
        raise WorkerConnectionError(f"{self.name}: stream ended before [DONE]", data={"worker": self.name})


def _finish(reason: object) -> str:
    if reason in ("length", "max_tokens"):
        return "length"
    if reason in ("tool_calls", "function_call"):
        return "tool_calls"
    return "stop"
