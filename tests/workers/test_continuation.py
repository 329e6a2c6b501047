"""A partial answer continued (a failover's prefix): each worker sends it the way its
provider continues an assistant's turn, against the protocol-faithful fakes, and
OpenAI's API, which cannot, says so."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.llamacpp import FakeLlamaCpp
from tests.fakes.openai import FakeOpenAI
from tests.workers.conftest import Rig
from workers.anthropic import AnthropicWorker
from workers.base import StreamingModelWorker, WorkerSettings
from workers.echo import EchoWorker, continued, echo_tokens
from workers.llamacpp import LlamaCppWorker
from workers.openai import OpenAIWorker
from workers.registry import build_worker
from workers.types import AssembledPrompt, ChatMessage, TokenChunk
from workers.vllm import VllmWorker

PROMPT = AssembledPrompt(messages=(ChatMessage("system", "sys"), ChatMessage("user", "say hello world")), model="m-1", max_tokens=64)


def make(cls: type, kind: str, **kw: object) -> object:
    return cls(WorkerSettings(name=kind, kind=kind, base_url="http://127.0.0.1:1", **kw))  # type: ignore[arg-type]


def stream(rig: Rig, prompt: AssembledPrompt) -> list[TokenChunk]:
    return asyncio.run(_collect(rig.worker, prompt))


def test_openai_sends_the_prefix_as_the_last_turn_and_cannot_continue_it() -> None:
    body = make(OpenAIWorker, "openai").body(dataclasses.replace(PROMPT, prefix="Hello,"), stream=True)  # type: ignore[attr-defined]
    assert body["messages"][-1] == {"role": "assistant", "content": "Hello,"}
    assert "continue_final_message" not in body
    assert OpenAIWorker.continues_prefix is False


def test_vllm_continues_the_final_message_without_a_generation_prompt() -> None:
    worker = make(VllmWorker, "vllm")
    body = worker.body(dataclasses.replace(PROMPT, prefix="Hello,"), stream=True)  # type: ignore[attr-defined]
    assert body["messages"][-1] == {"role": "assistant", "content": "Hello,"}
    assert (body["continue_final_message"], body["add_generation_prompt"]) == (True, False)
    assert "continue_final_message" not in worker.body(PROMPT, stream=True)  # type: ignore[attr-defined]


def test_anthropic_prefills_without_trailing_whitespace() -> None:
    worker = make(AnthropicWorker, "anthropic")
    body = worker.body(dataclasses.replace(PROMPT, prefix="Hello, "), stream=True)  # type: ignore[attr-defined]
    assert body["messages"][-1] == {"role": "assistant", "content": "Hello,"}
    assert worker.body(dataclasses.replace(PROMPT, prefix="  \n"), stream=True)["messages"][-1]["role"] == "user"  # type: ignore[attr-defined]


def test_llamacpp_writes_the_prefix_after_the_assistants_open_turn() -> None:
    body = make(LlamaCppWorker, "llamacpp").body(dataclasses.replace(PROMPT, prefix="Hello,"), stream=True)  # type: ignore[attr-defined]
    assert body["prompt"].endswith("<|im_start|>assistant\nHello,")
    plain = make(LlamaCppWorker, "llamacpp", prompt_format="plain").body(dataclasses.replace(PROMPT, prefix="Hi"), stream=True)  # type: ignore[attr-defined]
    assert plain["prompt"].endswith("assistant:Hi")


CONTINUING = {"vllm": (FakeOpenAI, "/v1"), "anthropic": (FakeAnthropic, ""), "llamacpp": (FakeLlamaCpp, "")}


@pytest.fixture(params=sorted(CONTINUING))
def continuing(request: pytest.FixtureRequest) -> Iterator[Rig]:
    """Each worker whose provider continues a partial answer, on its own fake."""
    kind = request.param
    fake_cls, suffix = CONTINUING[kind]
    fake = fake_cls()
    if isinstance(fake, FakeOpenAI):
        fake.dialect = "vllm"
    fake.start()
    settings = WorkerSettings(name=f"{kind}-test", kind=kind, base_url=fake.url + suffix, timeout_s=2, connect_timeout_s=1)
    yield Rig(kind, fake, build_worker(settings))
    fake.stop()


@pytest.mark.parametrize("prefix", ["Hello,", "Hel", "Hello, world!"])
def test_each_provider_that_can_continues_from_the_prefix(continuing: Rig, prefix: str) -> None:
    chunks = stream(continuing, dataclasses.replace(PROMPT, prefix=prefix))
    assert prefix + "".join(c.text for c in chunks) == "Hello, world!" and chunks[-1].is_final
    assert getattr(continuing.worker, "continues_prefix", False) is True
    sent = continuing.fake.requests[-1]["body"]
    said = sent["prompt"] if continuing.kind == "llamacpp" else sent["messages"][-1]["content"]
    assert said.endswith(prefix)  # the provider was given the answer so far


def test_anthropic_drops_the_whitespace_it_could_not_prefill_from_the_continuation() -> None:
    fake = FakeAnthropic().start()
    try:
        worker = build_worker(WorkerSettings(name="a", kind="anthropic", base_url=fake.url, timeout_s=2))
        chunks = asyncio.run(_collect(worker, dataclasses.replace(PROMPT, prefix="Hello, ")))
        assert "Hello, " + "".join(c.text for c in chunks) == "Hello, world!"
        assert worker.infer(dataclasses.replace(PROMPT, prefix="Hello, ")).text == "world!"
        assert fake.requests[-1]["body"]["messages"][-1] == {"role": "assistant", "content": "Hello,"}
    finally:
        fake.stop()


async def _collect(worker: StreamingModelWorker, prompt: AssembledPrompt) -> list[TokenChunk]:
    return [chunk async for chunk in worker.infer_stream(prompt)]


def test_the_fakes_refuse_what_the_providers_refuse() -> None:
    """Anthropic refuses a prefill ending in whitespace; vLLM, a continued final message
    with a generation prompt. The workers never send either (above)."""
    anthropic, vllm = FakeAnthropic(), FakeOpenAI()
    vllm.dialect = "vllm"
    prefill = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello "}]}
    assert anthropic.dispatch("/v1/messages", prefill).status == 400  # type: ignore[union-attr]
    both = {"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}], "continue_final_message": True}
    assert vllm.dispatch("/v1/chat/completions", both).status == 400  # type: ignore[union-attr]
    assert vllm.dispatch("/v1/chat/completions", {**both, "add_generation_prompt": False}).status == 200  # type: ignore[union-attr]


def test_openais_api_answers_a_trailing_assistant_turn_anew() -> None:
    """As the API does, so does its fake: the reason a failover passes OpenAI workers over."""
    fake = FakeOpenAI().start()
    try:
        worker = build_worker(WorkerSettings(name="o", kind="openai", base_url=fake.url + "/v1", timeout_s=2))
        chunks = asyncio.run(_collect(worker, dataclasses.replace(PROMPT, prefix="Hello,")))
        assert "".join(c.text for c in chunks) == "Hello, world!"  # from the start again: no continuation
    finally:
        fake.stop()


def test_echo_continues_its_own_answer() -> None:
    worker = EchoWorker(WorkerSettings(name="echo", kind="echo", token_count=6))
    whole, _ = echo_tokens(PROMPT, 6)
    assert "".join(whole) == "say hello world say hello world"

    async def run(prefix: str) -> str:
        return "".join([c.text async for c in worker.infer_stream(dataclasses.replace(PROMPT, prefix=prefix))])

    assert "say hel" + asyncio.run(run("say hel")) == "".join(whole)
    assert worker.infer(dataclasses.replace(PROMPT, prefix="say hello")).text == " world say hello world"
    assert asyncio.run(run("something else")) == "".join(whole)  # not its answer: it answers anew


@given(tokens=st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=8), cut=st.integers(min_value=0, max_value=40))
def test_continued_is_the_rest_of_the_answer(tokens: list[str], cut: int) -> None:
    answer = "".join(tokens)
    prefix = answer[: min(cut, len(answer))]
    rest = continued(tokens, prefix)
    assert prefix + "".join(rest) == answer
    assert all(rest[1:][i] == tokens[len(tokens) - len(rest) + 1 + i] for i in range(len(rest) - 1))  # whole tokens after the first
