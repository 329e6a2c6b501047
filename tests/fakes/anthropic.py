"""A fake Anthropic Messages API server with its named SSE events."""

from __future__ import annotations

import json
from typing import Any

from tests.fakes.server import FakeProvider, Reply, SseReply, continued, json_reply, pieces, sse_event, tool_arguments, tool_result_reply

TOOL_USE_ID = "toolu_fake_1"


def blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])


def conversation_problem(messages: list[dict[str, Any]]) -> str | None:
    """What the Messages API refuses in a conversation: turns that do not alternate, a
    tool_result that answers no tool_use of the turn before."""
    for i, message in enumerate(messages):
        if i and messages[i - 1].get("role") == message.get("role"):
            return f'messages: roles must alternate between "user" and "assistant", but found multiple "{message.get("role")}" roles in a row'
        used = {b.get("id") for b in blocks(messages[i - 1])} if i else set()
        for block in blocks(message):
            if block.get("type") == "tool_result" and block.get("tool_use_id") not in used:
                return f"messages.{i}.content: unexpected `tool_use_id` found in `tool_result` blocks: {block.get('tool_use_id')}"
    return None


def planned_tool_use(body: dict[str, Any]) -> dict[str, Any] | None:
    """The tool_use block the fake answers with: tools offered, not refused by
    ``tool_choice``, and no tool result in the last turn."""
    tools, choice, messages = body.get("tools") or [], body.get("tool_choice") or {"type": "auto"}, body.get("messages") or []
    if not tools or choice.get("type") == "none" or any(b.get("type") == "tool_result" for b in blocks(messages[-1])):
        return None
    name = choice["name"] if choice.get("type") == "tool" else tools[0]["name"]
    tool = next(t for t in tools if t["name"] == name)
    user = next((b["text"] for m in reversed(messages) if m.get("role") == "user" for b in blocks(m) if b.get("type") == "text"), "")
    return {"type": "tool_use", "id": TOOL_USE_ID, "name": name, "input": tool_arguments(tool.get("input_schema"), user)}


def tool_result_text(messages: list[dict[str, Any]]) -> str | None:
    results = [b for b in blocks(messages[-1]) if b.get("type") == "tool_result"] if messages else []
    return str(results[-1].get("content")) if results else None


class FakeAnthropic(FakeProvider):
    def error_body(self, status: int) -> dict[str, Any]:
        kinds = {429: "rate_limit_error", 401: "authentication_error", 529: "overloaded_error", 500: "api_error", 503: "api_error"}
        return {"type": "error", "error": {"type": kinds.get(status, "api_error"), "message": f"fake {status}"}}

    def reply(self, path: str, body: dict[str, Any]) -> Reply | SseReply:
        if path != "/v1/messages":
            return json_reply(404, self.error_body(404))
        if "max_tokens" not in body:
            return json_reply(400, {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}})
        model = str(body.get("model", "claude-fake"))
        messages = body.get("messages") or []
        problem = conversation_problem(messages)
        if problem is not None:
            return json_reply(400, {"type": "error", "error": {"type": "invalid_request_error", "message": problem}})
        result = tool_result_text(messages)
        answer = self.tokens if result is None else tool_result_reply(result)
        if messages and messages[-1].get("role") == "assistant":  # a prefill: the reply continues it
            prefill = "".join(str(b.get("text") or "") for b in blocks(messages[-1]) if b.get("type") == "text")
            if prefill != prefill.rstrip():
                message = "messages: final assistant content cannot end with trailing whitespace"
                return json_reply(400, {"type": "error", "error": {"type": "invalid_request_error", "message": message}})
            answer = continued(answer, prefill)
        tokens = answer[: int(body["max_tokens"])]
        stop_reason = "max_tokens" if len(answer) > len(tokens) else "end_turn"
        tool_use = planned_tool_use(body)
        if tool_use is not None:
            tokens, stop_reason = [], "tool_use"
        input_tokens = sum(len(str(b.get("text") or b.get("content") or "").split()) for m in messages for b in blocks(m))
        if self.context_window is not None and input_tokens > self.context_window:
            message = f"prompt is too long: {input_tokens} tokens > {self.context_window} maximum"
            return json_reply(400, {"type": "error", "error": {"type": "invalid_request_error", "message": message}})
        if not body.get("stream"):
            if self.mode == "malformed":
                return Reply(body=b"<html>bad gateway</html>", content_type="text/html")
            return json_reply(
                200,
                {
                    "id": "msg_fake",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [tool_use] if tool_use else [{"type": "text", "text": "".join(tokens)}],
                    "stop_reason": stop_reason,
                    "stop_sequence": None,
                    "usage": {"input_tokens": input_tokens, "output_tokens": len(tokens)},
                },
            )
        return SseReply(
            self._events(model, tokens, stop_reason, input_tokens, tool_use),
            drop_after=(3 + len(tokens) // 2) if self.mode == "drop" else None,
            delay_s=self.token_delay_s,
        )

    def _events(self, model: str, tokens: list[str], stop_reason: str, input_tokens: int, tool_use: dict[str, Any] | None) -> list[bytes]:
        def ev(kind: str, payload: dict[str, Any]) -> bytes:
            return sse_event(json.dumps({"type": kind, **payload}), event=kind)

        events = [
            ev(
                "message_start",
                {
                    "message": {
                        "id": "msg_fake",
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "usage": {"input_tokens": input_tokens, "output_tokens": 1},
                    }
                },
            ),
            ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            ev("ping", {}),
        ]
        events += [ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": t}}) for t in tokens]
        if self.mode == "malformed":
            events.insert(4, b"event: content_block_delta\ndata: {oops\n\n")
        if self.mode == "overloaded":
            events.insert(4, ev("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}}))
        events.append(ev("content_block_stop", {"index": 0}))
        if tool_use is not None:
            # As the API streams a tool_use block: empty input first, then its JSON in pieces.
            events.append(ev("content_block_start", {"index": 1, "content_block": {**tool_use, "input": {}}}))
            events.append(ev("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}}))
            events += [
                ev("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": p}}) for p in pieces(json.dumps(tool_use["input"]))
            ]
            events.append(ev("content_block_stop", {"index": 1}))
        events += [
            ev("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": None}, "usage": {"output_tokens": len(tokens)}}),
        ]
        if self.mode != "cut":
            events.append(ev("message_stop", {}))
        return events
