"""Anthropic Messages API (``POST /v1/messages``) and its SSE event stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from orchestrator_site.errors import TransientWorkerError, WorkerConnectionError, WorkerProtocolError
from workers.base import TOOLS, WorkerSettings
from workers.http import HttpClients, check_response, json_object, translate_errors
from workers.sse import aiter_sse, read_to_end
from workers.types import AssembledPrompt, ChatMessage, Completion, GenerationOptions, TokenChunk, ToolCall, Usage

API_VERSION = "2023-06-01"


def messages_of(messages: tuple[ChatMessage, ...]) -> list[dict[str, Any]]:
    """The conversation in the Messages API's terms: tool calls as ``tool_use`` blocks of
    the assistant's turn, tool results as ``tool_result`` blocks of a user turn, and
    consecutive turns of one role merged (the API wants them to alternate)."""
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            continue  # the API takes it apart (``body``)
        role = "user" if message.role == "tool" else message.role
        blocks: list[dict[str, Any]] = []
        if message.role == "tool":
            blocks.append({"type": "tool_result", "tool_use_id": message.tool_call_id, "content": message.content})
        elif message.content:
            blocks.append({"type": "text", "text": message.content})
        blocks += [{"type": "tool_use", "id": c.id, "name": c.name, "input": json.loads(c.arguments or "{}")} for c in message.tool_calls]
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    return [_plain(turn) for turn in turns]


def _plain(turn: dict[str, Any]) -> dict[str, Any]:
    """A turn of one text block as the plain string it was."""
    blocks = turn["content"]
    if len(blocks) == 1 and blocks[0]["type"] == "text":
        return {"role": turn["role"], "content": blocks[0]["text"]}
    return turn


def tools_of(options: GenerationOptions) -> dict[str, Any]:
    """OpenAI's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` as the Messages API's."""
    fields: dict[str, Any] = {}
    if options.tools:
        fields["tools"] = [_tool(tool["function"]) for tool in options.tools]
    choice: dict[str, Any] | None = None
    if isinstance(options.tool_choice, str):
        choice = {"type": {"auto": "auto", "required": "any", "none": "none"}[options.tool_choice]}
    elif isinstance(options.tool_choice, Mapping):
        choice = {"type": "tool", "name": options.tool_choice["function"]["name"]}
    if options.parallel_tool_calls is False and options.tools:
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None:
        fields["tool_choice"] = choice
    return fields


def _tool(function: Mapping[str, Any]) -> dict[str, Any]:
    tool = {"name": function["name"], "input_schema": function.get("parameters") or {"type": "object", "properties": {}}}
    if function.get("description"):
        tool["description"] = function["description"]
    return tool


class AnthropicWorker:
    supports_streaming = True
    # No seed, penalties, logit bias, logprobs or response format in the Messages API.
    accepts = frozenset({"top_p", "user"}) | TOOLS
    # A last assistant turn is a prefill the model continues (without its trailing
    # whitespace, which the API refuses: ``_seam``).
    continues_prefix = True
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
            "messages": messages_of(prompt.messages) + _prefill(prompt.prefix),
            "stream": stream,
        }
        if system:
            body["system"] = system
        if prompt.temperature is not None:
            body["temperature"] = min(prompt.temperature, 1.0)  # Anthropic's range is 0..1
        if prompt.stop:
            body["stop_sequences"] = list(prompt.stop)
        if prompt.options.top_p is not None:
            body["top_p"] = prompt.options.top_p
        if prompt.options.user is not None:
            body["metadata"] = {"user_id": prompt.options.user}
        body.update(tools_of(prompt.options))
        return body

    def infer(self, prompt: AssembledPrompt) -> Completion:
        with translate_errors(self.name):
            response = self._http.post(self.path, json=self.body(prompt, stream=False))
            check_response(self.name, response)
            payload = json_object(self.name, response.content)
            text = _seam(prompt.prefix, "".join(block["text"] for block in payload["content"] if block.get("type") == "text"))
            calls = tuple(
                ToolCall(id=str(b["id"]), name=str(b["name"]), arguments=json.dumps(b.get("input") or {}))
                for b in payload["content"]
                if b.get("type") == "tool_use"
            )
            usage = payload.get("usage") or {}
            return Completion(
                text=text,
                model=str(payload.get("model") or prompt.model),
                worker=self.name,
                finish_reason=_finish(payload.get("stop_reason")),
                usage=Usage(int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))),
                tool_calls=calls,
            )

    async def infer_stream(self, prompt: AssembledPrompt) -> AsyncIterator[TokenChunk]:
        index = 0
        input_tokens = output_tokens = 0
        finish = "stop"
        tool_index: dict[int, int] = {}  # the content block of each tool_use, to its place among the calls
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
                    elif kind == "content_block_start" and payload["content_block"].get("type") == "tool_use":
                        block = payload["content_block"]
                        place = tool_index[int(payload["index"])] = len(tool_index)
                        start = {"index": place, "id": str(block["id"]), "type": "function", "function": {"name": str(block["name"]), "arguments": ""}}
                        yield TokenChunk(index=index, text="", tool_calls=(start,))
                        index += 1
                    elif kind == "content_block_delta":
                        delta = payload["delta"]
                        text = str(delta.get("text") or "") if delta.get("type") == "text_delta" else ""
                        if text and index == 0:
                            text = _seam(prompt.prefix, text)
                        if text:
                            yield TokenChunk(index=index, text=text)
                            index += 1
                        elif delta.get("type") == "input_json_delta" and delta.get("partial_json"):
                            piece = {"index": tool_index[int(payload["index"])], "function": {"arguments": str(delta["partial_json"])}}
                            yield TokenChunk(index=index, text="", tool_calls=(piece,))
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


def _prefill(prefix: str) -> list[dict[str, Any]]:
    """The answer so far as the assistant's last turn, which the model continues. The
    API refuses a final assistant turn that ends in whitespace: it is sent without it."""
    return [{"role": "assistant", "content": prefix.rstrip()}] if prefix.strip() else []


def _seam(prefix: str, text: str) -> str:
    """The first text of a continued answer. Where the prefill lost the prefix's trailing
    whitespace, the model writes it again at the start: the client already has it."""
    return text.lstrip() if prefix.strip() and prefix != prefix.rstrip() else text


def _stream_error(worker: str, payload: dict[str, Any]) -> Exception:
    error = payload.get("error") or {}
    data = {"worker": worker, "upstream_type": error.get("type"), "upstream_message": error.get("message")}
    if error.get("type") in ("overloaded_error", "api_error", "rate_limit_error"):
        return TransientWorkerError(f"{worker}: {error.get('type')} in stream", data=data)
    return WorkerProtocolError(f"{worker}: error event in stream", data=data)


def _finish(reason: object) -> str:
    return {"max_tokens": "length", "tool_use": "tool_calls"}.get(str(reason), "stop")
