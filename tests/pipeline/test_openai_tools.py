"""Function calling, JSON output, logprobs and the sampling fields through the gateway,
with the official ``openai`` SDK as the client, a real Daphne gateway and a real
Celery worker: what an application moving behind the gateway sends, and what it
gets back, per worker. A field a worker cannot honour is refused by name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from pipeline.resilience.dedup import dedup_key
from pipeline.types import ChatMessage, GenerationOptions, PromptRequest, ToolCall
from tests.conftest import Fakes, TenantFixture, WorkerProcess, start_gateway, stop_process

WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def gateway(realtime_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_gateway(tmp_path_factory.mktemp("tools") / "gateway.log")
    yield url
    stop_process(proc)


def client(gateway: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0, timeout=30)


def streamed_calls(chunks: list[Any]) -> dict[int, dict[str, str]]:
    """The tool calls of a stream, joined from their deltas as an SDK user joins them."""
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] = (delta.function and delta.function.name) or call["name"]
            call["arguments"] += (delta.function and delta.function.arguments) or ""
    return calls


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
@pytest.mark.parametrize("model", ["openai/gpt-fake", "vllm", "anthropic"])
def test_a_tool_call_and_its_result_round_trip(gateway: str, owner: TenantFixture, fakes: Fakes, model: str) -> None:
    sdk = client(gateway, owner.key)
    messages: list[Any] = [{"role": "user", "content": "Paris"}]
    whole = sdk.chat.completions.create(
        model=model, messages=messages, tools=[CLOCK, WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None and choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(sdk.chat.completions.create(model=model, messages=messages, tools=[WEATHER], stream=True))
    assert streamed_calls(chunks) == {0: {"id": call.id, "name": "get_weather", "arguments": call.function.arguments}}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    # The application runs the tool and sends its result: the model answers from it.
    messages += [choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "18C"}]
    final = sdk.chat.completions.create(model=model, messages=messages, tools=[WEATHER])
    assert final.choices[0].message.content == "Tool said: 18C" and final.choices[0].finish_reason == "stop"
    streamed = list(sdk.chat.completions.create(model=model, messages=messages, tools=[WEATHER], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "Tool said: 18C"


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_every_option_reaches_openai_unchanged_and_logprobs_come_back(gateway: str, owner: TenantFixture, fakes: Fakes) -> None:
    sdk = client(gateway, owner.key)
    options: dict[str, Any] = {
        "top_p": 0.5,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "logit_bias": {"50256": -100},
        "user": "end-user-7",
        "response_format": {"type": "json_object"},
        "parallel_tool_calls": False,
        "tools": [WEATHER],
        "tool_choice": "none",
    }
    completion = sdk.chat.completions.create(model="openai/gpt-fake", messages=[{"role": "user", "content": "opts"}], logprobs=True, top_logprobs=2, **options)
    sent = fakes.openai.requests[-1]["body"]
    assert {name: sent[name] for name in options} == options and (sent["logprobs"], sent["top_logprobs"]) == (True, 2)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [entry.token for entry in logprobs.content] == ["Hello", ",", " world", "!"] and len(logprobs.content[0].top_logprobs) == 2
    chunks = list(sdk.chat.completions.create(model="openai/gpt-fake", messages=[{"role": "user", "content": "opts, streamed"}], logprobs=True, stream=True))
    assert [entry.token for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content or []] == [
        "Hello",
        ",",
        " world",
        "!",
    ]


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_json_schema_reaches_llamacpp_as_its_grammar(gateway: str, owner: TenantFixture, fakes: Fakes) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    completion = client(gateway, owner.key).chat.completions.create(
        model="llamacpp",
        messages=[{"role": "user", "content": "json please"}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    assert json.loads(completion.choices[0].message.content or "") == {"answer": "Hello, world!"}
    assert fakes.llamacpp.requests[-1]["body"]["json_schema"] == schema


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("model", "fields", "refused"),
    [
        ("echo", {"tools": [WEATHER]}, "tools"),
        ("echo", {"response_format": {"type": "json_object"}}, "response_format"),
        ("echo", {"logprobs": True}, "logprobs"),
        ("anthropic", {"logit_bias": {"1": 1}}, "logit_bias"),
        ("anthropic", {"presence_penalty": 0.5}, "presence_penalty"),
        ("anthropic", {"response_format": {"type": "json_object"}}, "response_format"),
        ("llamacpp", {"tools": [WEATHER]}, "tools"),
        ("llamacpp", {"logprobs": True, "top_logprobs": 1}, "logprobs"),
    ],
)
def test_a_field_the_worker_cannot_honour_is_refused_by_name(owner: TenantFixture, fakes: Fakes, model: str, fields: dict[str, Any], refused: str) -> None:
    resp = owner.client.post("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "x"}], **fields}, format="json")
    error = resp.json()["error"]
    assert resp.status_code == 400 and (error["code"], error["param"], error["type"]) == ("unsupported_parameter", refused, "invalid_request_error")
    assert model in error["message"] and refused in error["message"]


@pytest.mark.django_db
def test_tool_turns_need_a_worker_with_tools(owner: TenantFixture, fakes: Fakes) -> None:
    turns = [
        {"role": "user", "content": "Paris"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
    ]
    resp = owner.client.post("/v1/chat/completions", {"model": "llamacpp", "messages": turns}, format="json")
    assert resp.status_code == 400 and (resp.json()["error"]["code"], resp.json()["error"]["param"]) == ("unsupported_parameter", "messages")


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_echo_accepts_the_sampling_fields(gateway: str, owner: TenantFixture) -> None:
    sampled: dict[str, Any] = {
        "top_p": 0.2,
        "presence_penalty": 1,
        "frequency_penalty": -1,
        "logit_bias": {"7": 3},
        "user": "u",
        "response_format": {"type": "text"},
    }
    completion = client(gateway, owner.key).chat.completions.create(model="echo", messages=[{"role": "user", "content": "same words"}], **sampled)
    assert (completion.choices[0].message.content or "").startswith("same words")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "has spaces"}}]}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"top_p": 1.5}, "top_p"),
        ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
    ],
)
def test_malformed_options_are_refused_naming_the_field(owner: TenantFixture, fields: dict[str, Any], param: str) -> None:
    resp = owner.client.post("/v1/chat/completions", {"model": "openai", "messages": [{"role": "user", "content": "x"}], **fields}, format="json")
    error = resp.json()["error"]
    assert resp.status_code == 400 and (error["code"], error["param"]) == ("invalid_request", param)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "x"}, {"role": "tool", "content": "18C"}],  # no tool_call_id
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}],  # neither content nor calls
        [{"role": "user", "content": "x", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
        [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}],
    ],
)
def test_malformed_tool_turns_are_refused(owner: TenantFixture, messages: list[dict[str, Any]]) -> None:
    resp = owner.client.post("/v1/chat/completions", {"model": "openai", "messages": messages}, format="json")
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages"


@pytest.mark.django_db
@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "an answer"}],
        [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        ],
        [{"role": "system", "content": "only a system prompt"}],
    ],
)
def test_the_conversation_ends_with_the_user_or_a_tool_result(owner: TenantFixture, messages: list[dict[str, Any]]) -> None:
    resp = owner.client.post("/v1/chat/completions", {"model": "openai", "messages": messages}, format="json")
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_request" and resp.json()["error"]["param"] == "messages"


def test_every_field_that_changes_the_answer_is_in_the_dedup_key() -> None:
    base = PromptRequest(request_id="r", tenant_id="t", session_id="r", prompt="Paris", worker="openai", model="m", max_tokens=8)
    call = ToolCall("c1", "get_weather", '{"city": "Paris"}')
    variants = [
        base,
        PromptRequest(**{**base.__dict__, "options": GenerationOptions(tools=(WEATHER,))}),
        PromptRequest(**{**base.__dict__, "options": GenerationOptions(tools=(WEATHER,), tool_choice="required")}),
        PromptRequest(**{**base.__dict__, "options": GenerationOptions(response_format={"type": "json_object"})}),
        PromptRequest(**{**base.__dict__, "options": GenerationOptions(top_p=0.5)}),
        PromptRequest(**{**base.__dict__, "options": GenerationOptions(logit_bias={"1": 2.0})}),
        PromptRequest(**{**base.__dict__, "tool_turns": (ChatMessage("assistant", "", tool_calls=(call,)), ChatMessage("tool", "18C", tool_call_id="c1"))}),
        PromptRequest(**{**base.__dict__, "tool_turns": (ChatMessage("assistant", "", tool_calls=(call,)), ChatMessage("tool", "19C", tool_call_id="c1"))}),
    ]
    assert len({dedup_key(v) for v in variants}) == len(variants)
    # What cannot change the answer leaves it alone: the order of a logit bias's entries.
    assert dedup_key(PromptRequest(**{**base.__dict__, "options": GenerationOptions(logit_bias={"1": 2.0, "2": 1.0})})) == dedup_key(
        PromptRequest(**{**base.__dict__, "options": GenerationOptions(logit_bias={"2": 1.0, "1": 2.0})})
    )
    for variant in variants:
        assert PromptRequest.from_dict(json.loads(json.dumps(variant.to_dict()))) == variant  # it crosses into the task whole


@pytest.mark.django_db
@pytest.mark.parametrize("fields", [{"tools": [WEATHER]}, {"logprobs": True}, {"tool_choice": "auto", "parallel_tool_calls": True}])
def test_the_platforms_own_endpoints_refuse_tools_and_logprobs_by_name(owner: TenantFixture, fields: dict[str, Any]) -> None:
    resp = owner.client.post("/api/v1/infer", {"prompt": "x", **fields}, format="json")
    error = resp.json()["error"]
    assert resp.status_code == 400 and error["code"] == "unsupported_parameter" and error["data"]["fields"] == sorted(fields)
    assert "/v1/chat/completions" in error["message"]


@pytest.mark.django_db(transaction=True)
def test_the_platforms_own_endpoints_take_json_output_and_sampling(owner: TenantFixture, fakes: Fakes) -> None:
    from pipeline.api.inputs import InferInput, validated
    from pipeline.config import get_config
    from pipeline.services import start
    from tests.conftest import run_in_process

    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    given = {"prompt": "json", "worker": "llamacpp", "top_p": 0.25, "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}
    data = validated(InferInput, given).fields()
    run_in_process(start.infer_build_request(tenant_id=str(owner.tenant.id), data=data, config=get_config()))
    sent = fakes.llamacpp.requests[-1]["body"]
    assert (sent["top_p"], sent["json_schema"]) == (0.25, schema)
