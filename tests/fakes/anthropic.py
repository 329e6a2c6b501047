"""A fake Anthropic Messages API server with its named SSE events."""

from __future__ import annotations

import json
from typing import Any

from tests.fakes.server import FakeProvider, Reply, SseReply, json_reply, sse_event


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
        tokens = self.tokens[: int(body["max_tokens"])]
        stop_reason = "max_tokens" if len(self.tokens) > len(tokens) else "end_turn"
        input_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
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
                    "content": [{"type": "text", "text": "".join(tokens)}],
                    "stop_reason": stop_reason,
                    "stop_sequence": None,
                    "usage": {"input_tokens": input_tokens, "output_tokens": len(tokens)},
                },
            )
        return SseReply(
            self._events(model, tokens, stop_reason, input_tokens),
            drop_after=(3 + len(tokens) // 2) if self.mode == "drop" else None,
            delay_s=self.token_delay_s,
        )

    def _events(self, model: str, tokens: list[str], stop_reason: str, input_tokens: int) -> list[bytes]:
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
        events += [
            ev("content_block_stop", {"index": 0}),
            ev("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": None}, "usage": {"output_tokens": len(tokens)}}),
        ]
        if self.mode != "cut":
            events.append(ev("message_stop", {}))
        return events
