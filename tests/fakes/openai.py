"""A fake OpenAI Chat Completions server (vLLM's OpenAI-compatible server too)."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.fakes.server import FakeProvider, Reply, SseReply, json_reply, sse_event


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
        limit = int(body.get("max_completion_tokens") or body.get("max_tokens") or 1_000_000)
        tokens = self.tokens[:limit]
        finish = "length" if len(self.tokens) > limit else "stop"
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
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(tokens)}, "finish_reason": finish}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens), "total_tokens": prompt_tokens + len(tokens)},
                },
            )
        return SseReply(self._events(model, tokens, finish, prompt_tokens, body), drop_after=self._drop_after(tokens), delay_s=self.token_delay_s)

    def _drop_after(self, tokens: list[str]) -> int | None:
        return 1 + len(tokens) // 2 if self.mode == "drop" else None

    def _events(self, model: str, tokens: list[str], finish: str, prompt_tokens: int, body: dict[str, Any]) -> list[bytes]:
        def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> bytes:
            payload = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                **extra,
            }
            return sse_event(json.dumps(payload))

        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": t}) for t in tokens]
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
