from __future__ import annotations

import asyncio
import time

from hypothesis import given
from hypothesis import strategies as st

from workers.base import WorkerSettings
from workers.echo import EchoWorker, echo_tokens
from workers.types import AssembledPrompt, ChatMessage


def prompt(text: str, max_tokens: int = 100) -> AssembledPrompt:
    return AssembledPrompt(messages=(ChatMessage("system", "sys words"), ChatMessage("user", text)), model="echo-1", max_tokens=max_tokens)


def worker(**kw: float) -> EchoWorker:
    return EchoWorker(WorkerSettings(name="echo", kind="echo", **kw))  # type: ignore[arg-type]


def stream(w: EchoWorker, p: AssembledPrompt) -> list:
    async def run() -> list:
        return [c async for c in w.infer_stream(p)]

    return asyncio.run(run())


def test_echo_cycles_the_last_user_message_to_the_token_count() -> None:
    completion = worker(token_count=5).infer(prompt("a b"))
    assert completion.text == "a b a b a"
    assert completion.finish_reason == "stop"
    assert completion.usage.completion_tokens == 5 and completion.usage.prompt_tokens == 4
    assert completion.worker == "echo" and completion.model == "echo-1"


def test_max_tokens_cuts_with_length() -> None:
    completion = worker(token_count=10).infer(prompt("x", max_tokens=3))
    assert completion.text == "x x x" and completion.finish_reason == "length"


def test_empty_user_message_echoes_a_placeholder() -> None:
    p = AssembledPrompt(messages=(ChatMessage("system", "s"),), model="echo-1", max_tokens=5)
    assert worker(token_count=2).infer(p).text == "echo echo"


def test_zero_tokens() -> None:
    assert worker(token_count=0).infer(prompt("hi")).text == ""


def test_per_token_delay_applies_to_both_paths() -> None:
    w = worker(token_count=5, token_delay_s=0.02)
    started = time.monotonic()
    w.infer(prompt("a"))
    stream(w, prompt("a"))
    assert time.monotonic() - started >= 0.2


@given(st.text(max_size=80), st.integers(0, 40), st.integers(1, 60))
def test_stream_and_infer_agree(text: str, count: int, max_tokens: int) -> None:
    w = worker(token_count=count)
    p = prompt(text, max_tokens)
    chunks = stream(w, p)
    completion = w.infer(p)
    assert "".join(c.text for c in chunks) == completion.text
    assert chunks[-1].finish_reason == completion.finish_reason
    assert chunks[-1].usage == completion.usage
    assert len(chunks) - 1 == completion.usage.completion_tokens == min(count, max_tokens)


def test_deterministic() -> None:
    assert echo_tokens(prompt("q r s"), 7) == echo_tokens(prompt("q r s"), 7)
