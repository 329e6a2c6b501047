"""Events split anywhere by the network (mid-line, mid-UTF-8 character) reassemble intact."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes.server import FakeProvider, Reply, SseReply, sse_event
from workers.anthropic import AnthropicWorker
from workers.base import WorkerSettings
from workers.openai import OpenAIWorker
from workers.types import AssembledPrompt, ChatMessage

PROMPT = AssembledPrompt(messages=(ChatMessage("user", "hi"),), model="m", max_tokens=50)
TOKENS = ["Grüße", ", ", "世界", " 🚀", "\n", "done"]


class Rechunking(FakeProvider):
    def __init__(self) -> None:
        super().__init__()
        self.body = b""
        self.cuts: list[int] = []

    def reply(self, path: str, body: dict) -> Reply | SseReply:
        points = sorted({c % (len(self.body) + 1) for c in self.cuts} | {0, len(self.body)})
        pieces = [self.body[a:b] for a, b in itertools.pairwise(points) if b > a]
        return SseReply(pieces)


@pytest.fixture(scope="module")
def fake() -> Iterator[Rechunking]:
    fake = Rechunking().start()
    yield fake
    fake.stop()


def openai_body() -> bytes:
    chunks = [sse_event(json.dumps({"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]}, ensure_ascii=False)) for t in TOKENS]
    end = sse_event(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    return b"".join(chunks) + end + b"data: [DONE]\n\n"


def anthropic_body() -> bytes:
    def ev(kind: str, **payload: object) -> bytes:
        return sse_event(json.dumps({"type": kind, **payload}, ensure_ascii=False), event=kind)

    parts = [ev("message_start", message={"usage": {"input_tokens": 1}})]
    parts += [ev("content_block_delta", index=0, delta={"type": "text_delta", "text": t}) for t in TOKENS]
    parts += [ev("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 6}), ev("message_stop")]
    return b"".join(parts).replace(b"\n\n", b"\r\n\r\n", 2)  # some servers end lines with CRLF


def collect(worker: object) -> str:
    async def run() -> str:
        return "".join([c.text async for c in worker.infer_stream(PROMPT)])  # type: ignore[attr-defined]

    return asyncio.run(run())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(0, 5000), max_size=25))
def test_openai_stream_split_anywhere(fake: Rechunking, cuts: list[int]) -> None:
    fake.body, fake.cuts = openai_body(), cuts
    assert collect(OpenAIWorker(WorkerSettings(name="o", kind="openai", base_url=fake.url))) == "".join(TOKENS)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(0, 5000), max_size=25))
def test_anthropic_stream_split_anywhere(fake: Rechunking, cuts: list[int]) -> None:
    fake.body, fake.cuts = anthropic_body(), cuts
    assert collect(AnthropicWorker(WorkerSettings(name="a", kind="anthropic", base_url=fake.url))) == "".join(TOKENS)
