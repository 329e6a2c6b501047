"""A fake llama.cpp server: ``/completion`` and ``/health``."""

from __future__ import annotations

import json
from typing import Any

from tests.fakes.server import FakeProvider, Reply, SseReply, continued, json_reply, pieces, sse_event, tool_arguments


def constrained(schema: dict[str, Any], tokens: list[str]) -> list[str]:
    """What a grammar from ``schema`` lets the model write: a JSON object whose first
    property holds the reply's words (``{}`` when it names none), in pieces."""
    return pieces(json.dumps(tool_arguments(schema, "".join(tokens))))


class FakeLlamaCpp(FakeProvider):
    def error_body(self, status: int) -> dict[str, Any]:
        kinds = {503: "unavailable_error", 429: "unavailable_error", 401: "authentication_error"}
        return {"error": {"code": status, "message": "Loading model" if status == 503 else f"fake {status}", "type": kinds.get(status, "server_error")}}

    def reply(self, path: str, body: dict[str, Any]) -> Reply | SseReply:
        if path == "/health":
            return json_reply(200, {"status": "ok"})
        if path != "/completion":
            return json_reply(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})
        limit = int(body.get("n_predict", -1))
        answer = self.tokens if body.get("json_schema") is None else constrained(body["json_schema"], self.tokens)
        # The raw prompt ends with the assistant's open turn: text after it is a start the model continues.
        prompt = str(body.get("prompt", ""))
        opened = max((prompt.rfind(mark) + len(mark) for mark in ("<|im_start|>assistant\n", "assistant:") if mark in prompt), default=len(prompt))
        answer = continued(answer, prompt[opened:])
        tokens = answer if limit < 0 else answer[:limit]
        stop_type = "limit" if len(tokens) < len(answer) else "eos"
        evaluated = len(str(body.get("prompt", "")).split())
        if self.context_window is not None and evaluated > self.context_window:
            # As llama-server answers (seen from the real one, with -c set small).
            message = f"request ({evaluated} tokens) exceeds the available context size ({self.context_window} tokens), try increasing it"
            error = {"code": 400, "message": message, "type": "exceed_context_size_error", "n_prompt_tokens": evaluated, "n_ctx": self.context_window}
            return json_reply(400, {"error": error})
        final = {"content": "", "stop": True, "tokens_predicted": len(tokens), "tokens_evaluated": evaluated, "stop_type": stop_type, "model": "fake.gguf"}
        if not body.get("stream"):
            if self.mode == "malformed":
                return Reply(body=b'{"content": ')
            return json_reply(200, {**final, "content": "".join(tokens)})
        events = [sse_event(json.dumps({"content": t, "stop": False, "tokens_predicted": i + 1})) for i, t in enumerate(tokens)]
        if self.mode == "malformed":
            events.insert(1, b"data: {]\n\n")
        if self.mode != "cut":
            events.append(sse_event(json.dumps(final)))
        return SseReply(events, drop_after=(1 + len(tokens) // 2) if self.mode == "drop" else None, delay_s=self.token_delay_s)
