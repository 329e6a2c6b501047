"""Tools, JSON output and OpenAI's optional fields at each worker, against the fakes
(which answer in each provider's own wire format): sent on unchanged to OpenAI and
vLLM, translated for Anthropic and llama.cpp, and tool calls read back, streamed and
whole, in OpenAI's shapes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.llamacpp import FakeLlamaCpp
from tests.fakes.openai import FakeOpenAI
from workers.anthropic import AnthropicWorker, messages_of, tools_of
from workers.base import WorkerSettings
from workers.echo import EchoWorker
from workers.llamacpp import LlamaCppWorker, native_options
from workers.openai import OpenAIWorker
from workers.types import AssembledPrompt, ChatMessage, GenerationOptions, TokenChunk, ToolCall, ToolCallBuilder
from workers.vllm import VllmWorker

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
QUESTION = ChatMessage("user", "Paris")
CALLED = ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Paris"}'),))
ANSWERED = ChatMessage("tool", "18C", tool_call_id="call_1")
EVERY_OPTION = GenerationOptions(
    top_p=0.5,
    presence_penalty=0.1,
    frequency_penalty=-0.2,
    logit_bias={"50256": -100.0},
    logprobs=True,
    top_logprobs=2,
    user="u-1",
    tools=(WEATHER,),
    tool_choice="auto",
    parallel_tool_calls=False,
    response_format={"type": "json_object"},
)


def prompt(*messages: ChatMessage, options: GenerationOptions | None = None) -> AssembledPrompt:
    return AssembledPrompt(messages=(ChatMessage("system", "S"), *messages), model="m", max_tokens=50, options=options or GenerationOptions())


def stream(worker: Any, p: AssembledPrompt) -> list[TokenChunk]:
    async def collect() -> list[TokenChunk]:
        return [chunk async for chunk in worker.infer_stream(p)]

    return asyncio.run(collect())


def calls_of(chunks: list[TokenChunk]) -> tuple[ToolCall, ...]:
    builder = ToolCallBuilder()
    for chunk in chunks:
        builder.add(chunk.tool_calls)
    return builder.calls()


@pytest.fixture
def openai_fake() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI().start()
    yield fake
    fake.stop()


@pytest.fixture
def anthropic_fake() -> Iterator[FakeAnthropic]:
    fake = FakeAnthropic().start()
    yield fake
    fake.stop()


@pytest.fixture
def llama_fake() -> Iterator[FakeLlamaCpp]:
    fake = FakeLlamaCpp().start()
    yield fake
    fake.stop()


# --- OpenAI and vLLM: unchanged ------------------------------------------------------------
@pytest.mark.parametrize("worker_class", [OpenAIWorker, VllmWorker])
def test_every_option_goes_to_openai_and_vllm_unchanged(openai_fake: FakeOpenAI, worker_class: type[OpenAIWorker]) -> None:
    worker = worker_class(WorkerSettings(name="w", kind="openai", base_url=openai_fake.url))
    worker.infer(prompt(QUESTION, options=EVERY_OPTION))
    body = openai_fake.requests[-1]["body"]
    assert {name: body[name] for name in EVERY_OPTION.to_dict()} == json.loads(json.dumps(EVERY_OPTION.to_dict()))
    assert body["tools"] == [WEATHER] and body["logit_bias"] == {"50256": -100.0}
    worker.infer(prompt(QUESTION))
    assert not set(EVERY_OPTION.to_dict()) & set(openai_fake.requests[-1]["body"])  # nothing sent that was not asked for


@pytest.mark.parametrize("worker_class", [OpenAIWorker, VllmWorker])
def test_a_tool_call_comes_back_whole_and_streamed(openai_fake: FakeOpenAI, worker_class: type[OpenAIWorker]) -> None:
    worker = worker_class(WorkerSettings(name="w", kind="openai", base_url=openai_fake.url))
    asked = prompt(QUESTION, options=GenerationOptions(tools=(CLOCK, WEATHER), tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    whole = worker.infer(asked)
    expected = (ToolCall("call_fake_1", "get_weather", '{"city": "Paris"}'),)
    assert whole.tool_calls == expected and whole.finish_reason == "tool_calls" and whole.text == ""
    chunks = stream(worker, asked)
    assert calls_of(chunks) == expected and chunks[-1].finish_reason == "tool_calls"
    assert len([c for c in chunks if c.tool_calls]) > 2  # the arguments arrived in pieces, and each piece went on as it came


def test_the_conversations_tool_calls_and_results_go_in_openais_shape(openai_fake: FakeOpenAI) -> None:
    worker = OpenAIWorker(WorkerSettings(name="w", kind="openai", base_url=openai_fake.url))
    reply = worker.infer(prompt(QUESTION, CALLED, ANSWERED, options=GenerationOptions(tools=(WEATHER,))))
    assert reply.text == "Tool said: 18C" and reply.finish_reason == "stop" and reply.tool_calls == ()
    sent = openai_fake.requests[-1]["body"]["messages"]
    assert sent[-2:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "content": "18C", "tool_call_id": "call_1"},
    ]


def test_logprobs_come_back_whole_and_streamed(openai_fake: FakeOpenAI) -> None:
    worker = OpenAIWorker(WorkerSettings(name="w", kind="openai", base_url=openai_fake.url))
    asked = prompt(QUESTION, options=GenerationOptions(logprobs=True, top_logprobs=1))
    whole = worker.infer(asked)
    assert whole.logprobs is not None and [entry["token"] for entry in whole.logprobs] == ["Hello", ",", " world", "!"]
    assert whole.logprobs[0]["top_logprobs"][0]["token"] == "Hello"
    chunks = stream(worker, asked)
    assert [entry["token"] for c in chunks for entry in c.logprobs] == ["Hello", ",", " world", "!"]
    assert worker.infer(prompt(QUESTION)).logprobs is None  # not asked, not given


def test_the_openai_fake_refuses_a_tool_result_that_answers_no_call(openai_fake: FakeOpenAI) -> None:
    from orchestrator_site.errors import PermanentWorkerError

    worker = OpenAIWorker(WorkerSettings(name="w", kind="openai", base_url=openai_fake.url))
    with pytest.raises(PermanentWorkerError) as info:
        worker.infer(prompt(QUESTION, ANSWERED))
    assert "must be a response to a preceeding message with 'tool_calls'" in info.value.data["upstream_message"]


# --- Anthropic: translated ------------------------------------------------------------------
def test_tools_and_choices_become_anthropics() -> None:
    assert tools_of(GenerationOptions(tools=(WEATHER, CLOCK))) == {
        "tools": [
            {"name": "get_weather", "description": "the weather in a city", "input_schema": WEATHER["function"]["parameters"]},
            {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
        ]
    }
    choices = {
        "auto": {"type": "auto"},
        "required": {"type": "any"},
        "none": {"type": "none"},
    }
    for theirs, ours in choices.items():
        assert tools_of(GenerationOptions(tools=(WEATHER,), tool_choice=theirs))["tool_choice"] == ours
    named = tools_of(GenerationOptions(tools=(WEATHER,), tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert named["tool_choice"] == {"type": "tool", "name": "get_weather"}
    serial = tools_of(GenerationOptions(tools=(WEATHER,), parallel_tool_calls=False))
    assert serial["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert tools_of(GenerationOptions(tools=(WEATHER,), tool_choice="required", parallel_tool_calls=False))["tool_choice"] == {
        "type": "any",
        "disable_parallel_tool_use": True,
    }
    assert tools_of(GenerationOptions(tools=(WEATHER,), parallel_tool_calls=True)) == tools_of(GenerationOptions(tools=(WEATHER,)))


def test_tool_calls_and_results_become_tool_use_and_tool_result_blocks() -> None:
    second = ToolCall("call_2", "get_time", "{}")
    called_twice = ChatMessage("assistant", "let me look", tool_calls=(CALLED.tool_calls[0], second))
    turns = messages_of((ChatMessage("system", "S"), QUESTION, called_twice, ANSWERED, ChatMessage("tool", "noon", tool_call_id="call_2")))
    assert turns == [
        {"role": "user", "content": "Paris"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "let me look"},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
            ],
        },
        # Both results in one user turn: the API wants the roles to alternate.
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "noon"},
            ],
        },
    ]


def test_anthropic_round_trip_of_a_tool_call(anthropic_fake: FakeAnthropic) -> None:
    worker = AnthropicWorker(WorkerSettings(name="a", kind="anthropic", base_url=anthropic_fake.url))
    asked = prompt(QUESTION, options=GenerationOptions(tools=(WEATHER,), top_p=0.3, user="u-9"))
    whole = worker.infer(asked)
    expected = (ToolCall("toolu_fake_1", "get_weather", '{"city": "Paris"}'),)
    assert whole.tool_calls == expected and whole.finish_reason == "tool_calls"
    body = anthropic_fake.requests[-1]["body"]
    assert body["top_p"] == 0.3 and body["metadata"] == {"user_id": "u-9"} and body["tools"][0]["input_schema"]["required"] == ["city"]
    chunks = stream(worker, asked)
    assert calls_of(chunks) == expected and chunks[-1].finish_reason == "tool_calls"
    # The caller runs the tool and sends the result: the fake accepts the translated turns.
    continued = worker.infer(prompt(QUESTION, ChatMessage("assistant", "", tool_calls=expected), ChatMessage("tool", "18C", tool_call_id="toolu_fake_1")))
    assert continued.text == "Tool said: 18C" and continued.tool_calls == ()
    streamed = stream(worker, prompt(QUESTION, ChatMessage("assistant", "", tool_calls=expected), ChatMessage("tool", "18C", tool_call_id="toolu_fake_1")))
    assert "".join(c.text for c in streamed) == "Tool said: 18C"


def test_the_anthropic_fake_refuses_what_the_api_refuses(anthropic_fake: FakeAnthropic) -> None:
    from orchestrator_site.errors import PermanentWorkerError

    worker = AnthropicWorker(WorkerSettings(name="a", kind="anthropic", base_url=anthropic_fake.url))
    with pytest.raises(PermanentWorkerError) as info:
        worker.infer(prompt(QUESTION, ChatMessage("tool", "18C", tool_call_id="nobody")))
    assert "tool_use_id" in info.value.data["upstream_message"]


# --- llama.cpp: its own names ---------------------------------------------------------------
def test_llamacpp_takes_json_schemas_and_sampling_in_its_own_names() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    as_schema = GenerationOptions(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert native_options(as_schema) == {"json_schema": schema}
    assert native_options(GenerationOptions(response_format={"type": "json_object"})) == {"json_schema": {"type": "object"}}
    assert native_options(GenerationOptions(response_format={"type": "text"})) == {}
    sampled = GenerationOptions(top_p=0.9, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={"15043": 1.0}, user="dropped")
    assert native_options(sampled) == {"top_p": 0.9, "presence_penalty": 0.5, "frequency_penalty": 0.25, "logit_bias": [[15043, 1.0]]}


def test_llamacpp_answers_json_that_parses_under_a_schema(llama_fake: FakeLlamaCpp) -> None:
    worker = LlamaCppWorker(WorkerSettings(name="l", kind="llamacpp", base_url=llama_fake.url))
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    asked = prompt(QUESTION, options=GenerationOptions(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}))
    assert json.loads(worker.infer(asked).text) == {"answer": "Hello, world!"}
    assert json.loads("".join(c.text for c in stream(worker, asked))) == {"answer": "Hello, world!"}
    assert llama_fake.requests[-1]["body"]["json_schema"] == schema


# --- echo: sampling accepted and ignored ----------------------------------------------------
def test_echo_ignores_the_sampling_fields() -> None:
    worker = EchoWorker(WorkerSettings(name="e", kind="echo", token_count=3))
    sampled = GenerationOptions(top_p=0.1, presence_penalty=2.0, frequency_penalty=2.0, logit_bias={"1": 5.0}, user="u")
    assert worker.infer(prompt(QUESTION, options=sampled)).text == worker.infer(prompt(QUESTION)).text == "Paris Paris Paris"


# --- the types ------------------------------------------------------------------------------
def test_options_messages_and_chunks_survive_json() -> None:
    p = prompt(QUESTION, CALLED, ANSWERED, options=EVERY_OPTION)
    assert AssembledPrompt.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    chunk = TokenChunk(index=1, text="", tool_calls=({"index": 0, "function": {"arguments": "{"}},), logprobs=({"token": "a"},))
    assert TokenChunk.from_dict(json.loads(json.dumps(chunk.to_dict()))) == chunk
    assert ChatMessage.from_dict(["user", "old record"]) == ChatMessage("user", "old record")
    assert GenerationOptions(response_format={"type": "text"}).to_dict() == {}  # the default asks for nothing
    assert GenerationOptions.from_dict({"top_p": None, "tools": [WEATHER], "unknown": 1}) == GenerationOptions(tools=(WEATHER,))


def test_tool_call_deltas_build_whole_calls_in_their_order() -> None:
    builder = ToolCallBuilder()
    builder.add([{"index": 1, "id": "b", "type": "function", "function": {"name": "g", "arguments": ""}}])
    builder.add([{"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x"'}}])
    builder.add([{"index": 0, "function": {"arguments": ": 1}"}}, {"index": 1, "function": {"arguments": "{}"}}])
    assert builder.calls() == (ToolCall("a", "f", '{"x": 1}'), ToolCall("b", "g", "{}"))
    assert ToolCall("a", "f", "{}").delta(3) == {"index": 3, "id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def test_finish_reasons_of_every_provider_name_tool_calls_alike() -> None:
    from workers import anthropic, openai

    assert [openai._finish(r) for r in ("tool_calls", "function_call", "length", "max_tokens", "stop", None)] == [
        "tool_calls",
        "tool_calls",
        "length",
        "length",
        "stop",
        "stop",
    ]
    assert [anthropic._finish(r) for r in ("tool_use", "max_tokens", "end_turn", "stop_sequence", None)] == ["tool_calls", "length", "stop", "stop", "stop"]


def test_plain_turns_of_one_role_are_merged_into_text_blocks() -> None:
    merged = messages_of((ChatMessage("user", "one"), ChatMessage("user", "two"), ChatMessage("assistant", "three")))
    assert merged == [
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": "three"},
    ]


def test_a_logit_bias_by_token_text_stays_text_for_llamacpp() -> None:
    # llama.cpp also takes a bias by the token's text; OpenAI's ids become integers.
    assert native_options(GenerationOptions(logit_bias={"Hello": -1.0, "42": 2.0})) == {"logit_bias": [["Hello", -1.0], [42, 2.0]]}
