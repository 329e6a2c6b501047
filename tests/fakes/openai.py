"""A fake OpenAI Chat Completions server (vLLM's OpenAI-compatible server too)."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.fakes.server import FakeProvider, Reply, SseReply, continued, json_reply, pieces, sse_event, tool_arguments, tool_result_reply

CALL_ID = "call_fake_1"


def planned_call(body: dict[str, Any]) -> dict[str, Any] | None:
    """The tool call the fake answers with: when tools are offered, not refused by
    ``tool_choice``, and no tool result is in yet (then the named tool, else the first)."""
    tools, choice, messages = body.get("tools") or [], body.get("tool_choice", "auto"), body.get("messages") or []
    if not tools or choice == "none" or (messages and messages[-1].get("role") == "tool"):
        return None
    name = choice["function"]["name"] if isinstance(choice, dict) else tools[0]["function"]["name"]
    function = next(t["function"] for t in tools if t["function"]["name"] == name)
    user = next((str(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    return {"id": CALL_ID, "type": "function", "function": {"name": name, "arguments": json.dumps(tool_arguments(function.get("parameters"), user))}}


def unanswerable_tool_message(messages: list[dict[str, Any]]) -> int | None:
    """The index of a tool message that answers no earlier assistant tool call (OpenAI refuses it)."""
    called: set[str] = set()
    for i, message in enumerate(messages):
        called |= {c["id"] for c in message.get("tool_calls") or ()}
        if message.get("role") == "tool" and message.get("tool_call_id") not in called:
            return i
    return None


def logprob(token: str, top: int) -> dict[str, Any]:
    entry = {"token": token, "logprob": -0.25, "bytes": list(token.encode())}
    return {**entry, "top_logprobs": [entry] * top}


class FakeOpenAI(FakeProvider):
    dialect = "openai"  # "vllm": vLLM's server, which words some errors its own way

    def context_error(self, prompt_tokens: int, max_tokens: int) -> Reply:
        """What each server answers for a request longer than the model's context window."""
        window = self.context_window or 0
        if self.dialect == "vllm":
            message = (
                f"This model's maximum context length is {window} tokens. However, you requested {prompt_tokens + max_tokens} tokens "
                f"({prompt_tokens} in the messages, {max_tokens} in the completion). Please reduce the length of the messages or completion."
            )
            return json_reply(400, {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": 400})
        message = (
            f"This model's maximum context length is {window} tokens. However, your messages resulted in {prompt_tokens} tokens. "
            "Please reduce the length of the messages."
        )
        return json_reply(400, {"error": {"message": message, "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}})

    def error_body(self, status: int) -> dict[str, Any]:
        kinds = {
            429: ("Rate limit reached for requests", "requests", "rate_limit_exceeded"),
            401: ("Incorrect API key provided", "invalid_request_error", "invalid_api_key"),
        }
        message, kind, code = kinds.get(status, ("The server had an error while processing your request.", "server_error", None))
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}

    def reply(self, path: str, body: dict[str, Any]) -> Reply | SseReply:
        if path.rstrip("/").endswith("/models"):
            return json_reply(200, {"object": "list", "data": [{"id": "gpt-fake", "object": "model", "owned_by": "fake"}]})
        if not path.rstrip("/").endswith("/chat/completions"):
            return json_reply(404, {"error": {"message": f"Unknown path {path}", "type": "invalid_request_error"}})
        model = str(body.get("model", "gpt-fake"))
        messages = body.get("messages") or []
        orphan = unanswerable_tool_message(messages)
        if orphan is not None:
            message = "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'."
            return json_reply(400, {"error": {"message": message, "type": "invalid_request_error", "param": f"messages.[{orphan}].role", "code": None}})
        limit = int(body.get("max_completion_tokens") or body.get("max_tokens") or 1_000_000)
        answer = tool_result_reply(str(messages[-1].get("content"))) if messages and messages[-1].get("role") == "tool" else self.tokens
        if self.dialect == "vllm" and body.get("continue_final_message"):
            # vLLM's chat template left open on the last, assistant, turn: the model goes on from it.
            if body.get("add_generation_prompt", True):
                message = "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
                return json_reply(400, {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": 400})
            answer = continued(answer, str(messages[-1].get("content") or "")) if messages and messages[-1].get("role") == "assistant" else answer
        tokens = answer[:limit]
        finish = "length" if len(answer) > limit else "stop"
        call = planned_call(body)
        if call is not None:
            tokens, finish = [], "tool_calls"
        top = int(body.get("top_logprobs") or 0)
        logprobs = [logprob(t, top) for t in tokens] if body.get("logprobs") else None
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        if self.context_window is not None and prompt_tokens + (limit if self.dialect == "vllm" and limit < 1_000_000 else 0) > self.context_window:
            return self.context_error(prompt_tokens, limit)
        if not body.get("stream"):
            if self.mode == "malformed":
                return Reply(body=b'{"id": "chatcmpl-1", "choices": [')
            return json_reply(
                200,
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}
                            if call
                            else {"role": "assistant", "content": "".join(tokens), "refusal": None},
                            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                            "finish_reason": finish,
                        }
                    ],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens), "total_tokens": prompt_tokens + len(tokens)},
                },
            )
        events = self._events(model, tokens, finish, prompt_tokens, body, call)
        return SseReply(events, drop_after=self._drop_after(tokens), delay_s=self.token_delay_s)

    def _drop_after(self, tokens: list[str]) -> int | None:
        return 1 + len(tokens) // 2 if self.mode == "drop" else None

    def _events(self, model: str, tokens: list[str], finish: str, prompt_tokens: int, body: dict[str, Any], call: dict[str, Any] | None) -> list[bytes]:
        def chunk(delta: dict[str, Any], finish_reason: str | None = None, logprobs: Any = None) -> bytes:
            payload = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
            }
            return sse_event(json.dumps(payload))

        top = int(body.get("top_logprobs") or 0)
        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": t}, logprobs={"content": [logprob(t, top)]} if body.get("logprobs") else None) for t in tokens]
        if call is not None:
            # As OpenAI streams a call: its id, type and name first, then the arguments in pieces.
            function = call["function"]
            events.append(chunk({"tool_calls": [{"index": 0, "id": call["id"], "type": "function", "function": {"name": function["name"], "arguments": ""}}]}))
            events += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}) for piece in pieces(function["arguments"])]
        if self.mode == "malformed":
            events.insert(2, b"data: {not json\n\n")
        events.append(chunk({}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens), "total_tokens": prompt_tokens + len(tokens)}
            events.append(
                sse_event(json.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [], "usage": usage}))
            )
        if self.mode != "cut":
            events.append(b"data: [DONE]\n\n")
        return events
