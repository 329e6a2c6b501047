"""Protocol details of each provider beyond the common behaviour in test_providers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from orchestrator_site.errors import TransientWorkerError, WorkerConnectionError, WorkerProtocolError
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.llamacpp import FakeLlamaCpp
from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import FakeProvider, Reply, SseReply, json_reply, sse_event
from workers.anthropic import AnthropicWorker
from workers.base import WorkerSettings
from workers.llamacpp import LlamaCppWorker
from workers.openai import OpenAIWorker
from workers.types import AssembledPrompt, ChatMessage, TokenChunk, ToolCall, ToolCallBuilder
from workers.vllm import VllmWorker

PROMPT = AssembledPrompt(messages=(ChatMessage("system", "S1"), ChatMessage("system", "S2"), ChatMessage("user", "hi")), model="m", max_tokens=16)


class Scripted(FakeProvider):
    """Answers every request with what the test put in ``script``."""

    def __init__(self) -> None:
        super().__init__()
        self.script: Reply | SseReply = json_reply(200, {})

    def reply(self, path: str, body: dict) -> Reply | SseReply:
        return self.script


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    fake = Scripted().start()
    yield fake
    fake.stop()


def settings(url: str, kind: str = "openai", **kw: object) -> WorkerSettings:
    return WorkerSettings(name=kind, kind=kind, base_url=url, timeout_s=1, **kw)  # type: ignore[arg-type]


def stream(worker: object) -> list[TokenChunk]:
    async def run() -> list[TokenChunk]:
        return [c async for c in worker.infer_stream(PROMPT)]  # type: ignore[attr-defined]

    return asyncio.run(run())


# --- OpenAI / vLLM -----------------------------------------------------------------
def test_openai_null_content_and_missing_usage(scripted: Scripted) -> None:
    scripted.script = json_reply(200, {"choices": [{"message": {"role": "assistant", "content": None}, "finish_reason": "stop"}]})
    completion = OpenAIWorker(settings(scripted.url)).infer(PROMPT)
    assert completion.text == "" and completion.usage.total_tokens == 0 and completion.model == "m"


def test_openai_stream_with_crlf_and_cr_line_ends_cut_inside_a_character(scripted: Scripted) -> None:
    """Line ends of all three kinds (a proxy's CRLF, a lone CR), and chunks cut inside a
    UTF-8 character and between a CR and its LF: the tokens as written."""

    def event(text: str) -> bytes:
        return b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}, ensure_ascii=False).encode()

    body = event("héllo ✓") + b"\r\n\r\n" + event(" wörld") + b"\r\r" + b"data: [DONE]\r\n\r\n"
    inside = body.index("✓".encode()) + 1
    between = body.index(b"\r\n") + 1
    assert inside < between
    scripted.script = SseReply(events=[body[:inside], body[inside:between], body[between:]])
    chunks = stream(OpenAIWorker(settings(scripted.url)))
    assert [c.text for c in chunks] == ["héllo ✓", " wörld", ""] and chunks[-1].finish_reason == "stop"


def test_openai_empty_choices_is_a_protocol_error(scripted: Scripted) -> None:
    scripted.script = json_reply(200, {"choices": []})
    with pytest.raises(WorkerProtocolError):
        OpenAIWorker(settings(scripted.url)).infer(PROMPT)


def test_openai_stream_without_usage_chunk_still_finishes(scripted: Scripted) -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
    end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
    scripted.script = SseReply([sse_event(json.dumps(chunk)), sse_event(json.dumps(end)), b"data: [DONE]\n\n"])
    chunks = stream(OpenAIWorker(settings(scripted.url)))
    assert [c.text for c in chunks] == ["x", ""] and chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 0


def test_openai_error_event_mid_stream(scripted: Scripted) -> None:
    scripted.script = SseReply([sse_event(json.dumps({"error": {"message": "boom", "type": "server_error"}}))])
    with pytest.raises(WorkerProtocolError) as info:
        stream(OpenAIWorker(settings(scripted.url)))
    assert "boom" in info.value.data["upstream_message"]


def test_openai_non_object_event(scripted: Scripted) -> None:
    scripted.script = SseReply([b"data: [1, 2]\n\n"])
    with pytest.raises(WorkerProtocolError):
        stream(OpenAIWorker(settings(scripted.url)))


def test_vllm_sends_max_tokens_and_no_auth_without_a_key() -> None:
    fake = FakeOpenAI().start()
    try:
        VllmWorker(settings(fake.url + "/v1", kind="vllm")).infer(PROMPT)
        body, headers = fake.requests[-1]["body"], fake.headers_seen[-1]
        assert body["max_tokens"] == 16 and "max_completion_tokens" not in body
        assert "authorization" not in headers and "temperature" not in body and "stop" not in body
    finally:
        fake.stop()


def test_extra_headers_are_sent() -> None:
    fake = FakeOpenAI().start()
    try:
        OpenAIWorker(settings(fake.url + "/v1", extra_headers={"OpenAI-Organization": "org-1"})).infer(PROMPT)
        assert fake.headers_seen[-1]["openai-organization"] == "org-1"
    finally:
        fake.stop()


# --- Anthropic -------------------------------------------------------------------------
def test_anthropic_joins_system_messages_and_text_blocks(scripted: Scripted) -> None:
    scripted.script = json_reply(
        200,
        {
            "content": [{"type": "text", "text": "a"}, {"type": "tool_use", "id": "t", "name": "f", "input": {"x": 1}}, {"type": "text", "text": "b"}],
            "stop_reason": "stop_sequence",
            "usage": {"input_tokens": 3, "output_tokens": 2},
        },
    )
    worker = AnthropicWorker(settings(scripted.url, kind="anthropic"))
    completion = worker.infer(PROMPT)
    assert completion.text == "ab" and completion.finish_reason == "stop" and completion.usage.prompt_tokens == 3
    assert completion.tool_calls == (ToolCall(id="t", name="f", arguments='{"x": 1}'),)
    body = scripted.requests[-1]["body"]
    assert body["system"] == "S1\n\nS2" and body["messages"] == [{"role": "user", "content": "hi"}]
    assert "x-api-key" not in scripted.headers_seen[-1]


def test_anthropic_overloaded_event_mid_stream_is_transient() -> None:
    fake = FakeAnthropic().start()
    try:
        fake.mode = "overloaded"
        with pytest.raises(TransientWorkerError) as info:
            stream(AnthropicWorker(settings(fake.url, kind="anthropic")))
        assert info.value.data["upstream_type"] == "overloaded_error"
    finally:
        fake.stop()


def test_anthropic_other_error_event_is_permanent(scripted: Scripted) -> None:
    scripted.script = SseReply([sse_event(json.dumps({"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}), event="error")])
    with pytest.raises(WorkerProtocolError):
        stream(AnthropicWorker(settings(scripted.url, kind="anthropic")))


def test_anthropic_stream_turns_tool_use_blocks_into_tool_call_deltas(scripted: Scripted) -> None:
    def ev(kind: str, **payload: object) -> bytes:
        return sse_event(json.dumps({"type": kind, **payload}), event=kind)

    scripted.script = SseReply(
        [
            ev("message_start", message={"usage": {"input_tokens": 5}}),
            ev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
            ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "ok"}),
            ev("content_block_stop", index=0),
            ev("content_block_start", index=1, content_block={"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}),
            ev("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": ""}),
            ev("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": '{"a":'}),
            ev("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": "1}"}),
            ev("content_block_stop", index=1),
            ev("message_delta", delta={"stop_reason": "tool_use"}, usage={"output_tokens": 1}),
            ev("message_stop"),
        ]
    )
    chunks = stream(AnthropicWorker(settings(scripted.url, kind="anthropic")))
    assert [c.text for c in chunks] == ["ok", "", "", "", ""] and chunks[-1].finish_reason == "tool_calls"
    assert [c.tool_calls for c in chunks[1:4]] == [
        ({"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": ""}},),
        ({"index": 0, "function": {"arguments": '{"a":'}},),
        ({"index": 0, "function": {"arguments": "1}"}},),
    ]
    calls = ToolCallBuilder()
    for chunk in chunks:
        calls.add(chunk.tool_calls)
    assert calls.calls() == (ToolCall(id="toolu_1", name="f", arguments='{"a":1}'),)
    assert chunks[-1].usage is not None and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 1)


def test_anthropic_ignores_deltas_of_other_kinds(scripted: Scripted) -> None:
    def ev(kind: str, **payload: object) -> bytes:
        return sse_event(json.dumps({"type": kind, **payload}), event=kind)

    scripted.script = SseReply(
        [
            ev("message_start", message={"usage": {"input_tokens": 5}}),
            ev("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
            ev("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "hmm"}),
            ev("content_block_delta", index=0, delta={"type": "signature_delta", "signature": "x"}),
            ev("content_block_start", index=1, content_block={"type": "text", "text": ""}),
            ev("content_block_delta", index=1, delta={"type": "text_delta", "text": "ok"}),
            ev("message_delta", delta={"stop_reason": "max_tokens"}, usage={"output_tokens": 1}),
            ev("message_stop"),
        ]
    )
    chunks = stream(AnthropicWorker(settings(scripted.url, kind="anthropic")))
    assert [c.text for c in chunks] == ["ok", ""] and chunks[-1].finish_reason == "length"


# --- llama.cpp ------------------------------------------------------------------------
def test_llamacpp_plain_format_has_no_chatml_stop() -> None:
    fake = FakeLlamaCpp().start()
    try:
        LlamaCppWorker(settings(fake.url, kind="llamacpp", prompt_format="plain")).infer(PROMPT)
        body = fake.requests[-1]["body"]
        assert body["prompt"].endswith("assistant:") and body["stop"] == [] and body["cache_prompt"] is True
    finally:
        fake.stop()


def test_llamacpp_error_event_mid_stream(scripted: Scripted) -> None:
    scripted.script = SseReply([sse_event(json.dumps({"error": {"code": 500, "message": "context overflow"}}))])
    with pytest.raises(WorkerProtocolError):
        stream(LlamaCppWorker(settings(scripted.url, kind="llamacpp")))


def test_llamacpp_final_event_may_carry_text(scripted: Scripted) -> None:
    scripted.script = SseReply(
        [
            sse_event(json.dumps({"content": "a", "stop": False})),
            sse_event(json.dumps({"content": "b", "stop": True, "stop_type": "word", "tokens_predicted": 2, "tokens_evaluated": 4})),
        ]
    )
    chunks = stream(LlamaCppWorker(settings(scripted.url, kind="llamacpp")))
    assert [c.text for c in chunks] == ["a", "b"] and chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 6


def test_empty_body_stream_is_a_connection_error(scripted: Scripted) -> None:
    scripted.script = SseReply([])
    for worker in (
        OpenAIWorker(settings(scripted.url)),
        AnthropicWorker(settings(scripted.url, kind="anthropic")),
        LlamaCppWorker(settings(scripted.url, kind="llamacpp")),
    ):
        with pytest.raises(WorkerConnectionError):
            stream(worker)


def test_async_client_is_reused_within_a_loop() -> None:
    fake = FakeOpenAI().start()
    worker = OpenAIWorker(settings(fake.url + "/v1"))

    async def three() -> None:
        for _ in range(3):
            [c async for c in worker.infer_stream(PROMPT)]

    try:
        asyncio.run(three())
        assert len(fake.requests) == 3
        assert fake.open_connections <= 1  # one pooled connection carried all three streams
    finally:
        fake.stop()
