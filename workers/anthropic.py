"""Anthropic Messages API (``POST /v1/messages``) and its SSE event stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from orchestrator_site.errors import TransientWorkerError, WorkerConnectionError, WorkerProtocolError
from workers.base import WorkerSettings
from workers.http import HttpClients, check_response, json_object, translate_errors
from workers.sse import aiter_sse, read_to_end
from workers.types import AssembledPrompt, Completion, TokenChunk, Usage

API_VERSION = "2023-06-01"


class AnthropicWorker:
    supports_streaming = True
    accepts_seed = False  # the Messages API has no seed
    path = "/v1/messages"

    def __init__(self, settings: WorkerSettings) -> None:
        self.name = settings.name
        self.settings = settings
        headers = {"anthropic-version": API_VERSION}
        if settings.api_key:
            headers["x-api-key"] = settings.api_key
        self._http = HttpClients(settings, headers)

    def body(self, prompt: AssembledPrompt, *, stream: bool) -> dict[str, Any]:
        # The Messages API takes the system prompt apart and only user/assistant turns.
        system = "\n\n".join(m.content for m in prompt.messages if m.role == "system")
        body: dict[str, Any] = {
            "model": prompt.model,
            "max_tokens": prompt.max_tokens,
            "messages": [m.to_dict() for m in prompt.messages if m.role != "system"],
            "stream": stream,
        }
        if system:
            body["system"] = system
        if prompt.temperature is not None:
            body["temperature"] = min(prompt.temperature, 1.0)  # Anthropic's range is 0..1
        if prompt.stop:
            body["stop_sequences"] = list(prompt.stop)
        return body

    def infer(self, prompt: AssembledPrompt) -> Completion:
        with translate_errors(self.name):
            response = self._http.post(self.path, json=self.body(prompt, stream=False))
            check_response(self.name, response)
            payload = json_object(self.name, response.content)
            text = "".join(block["text"] for block in payload["content"] if block.get("type") == "text")
            usage = payload.get("usage") or {}
            return Completion(
                text=text,
                model=str(payload.get("model") or prompt.model),
                worker=self.name,
                finish_reason=_finish(payload.get("stop_reason")),
                usage=Usage(int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))),
            )

    async def infer_stream(self, prompt: AssembledPrompt) -> AsyncIterator[TokenChunk]:
        index = 0
        input_tokens = output_tokens = 0
        finish = "stop"
        with translate_errors(self.name):
            async with self._http.stream(self.path, self.body(prompt, stream=True)) as lines:
                events = aiter_sse(lines)
                async for event in events:
                    if event.event == "ping":
                        continue
                    payload = json_object(self.name, event.data)
                    kind = payload.get("type", event.event)
                    if kind == "message_start":
                        input_tokens = int(payload["message"].get("usage", {}).get("input_tokens", 0))
                    elif kind == "content_block_delta":
                        delta = payload["delta"]
                        if delta.get("type") == "text_delta" and delta.get("text"):
                            yield TokenChunk(index=index, text=str(delta["text"]))
                            index += 1
                    elif kind == "message_delta":
                        finish = _finish((payload.get("delta") or {}).get("stop_reason"))
                        output_tokens = int((payload.get("usage") or {}).get("output_tokens", output_tokens))
                    elif kind == "message_stop":
                        yield TokenChunk(index=index, text="", finish_reason=finish, usage=Usage(input_tokens, output_tokens))
                        await read_to_end(events)  # the connection goes back to the pool
                        return
                    elif kind == "error":
                        raise _stream_error(self.name, payload)
        raise WorkerConnectionError(f"{self.name}: stream ended before message_stop", data={"worker": self.name})


def _stream_error(worker: str, payload: dict[str, Any]) -> Exception:
    error = payload.get("error") or {}
    data = {"worker": worker, "upstream_type": error.get("type"), "upstream_message": error.get("message")}
    if error.get("type") in ("overloaded_error", "api_error", "rate_limit_error"):
        return TransientWorkerError(f"{worker}: {error.get('type')} in stream", data=data)
    return WorkerProtocolError(f"{worker}: error event in stream", data=data)


def _finish(reason: object) -> str:
    return "length" if reason == "max_tokens" else "stop"
