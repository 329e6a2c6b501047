"""The OpenAI-compatible API's input rules and stream shapes, in process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient

from orchestrator_site.errors import UnknownModel
from pipeline import streaming
from pipeline.api import openai_compat
from pipeline.api.inputs import ChatCompletionInput, validated
from pipeline.config import AssembleConfig, PipelineSettings, WorkerConfig
from pipeline.services import start
from pipeline.services.start import StartKind
from pipeline.stages.assemble import assemble
from pipeline.stages.context import StageContext
from pipeline.types import ChatMessage, PromptRequest
from tests.conftest import TenantFixture

CHAT = "/v1/chat/completions"


def post(owner: TenantFixture, body: dict[str, Any]) -> Any:
    return owner.client.post(CHAT, body, format="json")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "echo", "messages": []}, "messages"),
        ({"model": "echo", "messages": [{"role": "robot", "content": "x"}]}, "messages"),
        ({"model": "echo", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]}, "messages"),
        ({"model": "echo", "messages": [{"role": "user", "content": 5}]}, "messages"),
        ({"model": "echo", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "echo", "messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
        ({"model": "echo", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ({"model": "echo", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ],
)
def test_invalid_bodies_name_their_field(owner: TenantFixture, body: dict[str, Any], field: str) -> None:
    resp = post(owner, body)
    error = resp.json()["error"]
    assert resp.status_code == 400 and set(error) == {"message", "type", "param", "code"}  # OpenAI's shape
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_request", field)


@pytest.mark.django_db
def test_messages_longer_than_the_limit_are_refused(owner: TenantFixture, pipeline_config: Any) -> None:
    from pipeline.config import LimitsConfig

    pipeline_config(PipelineSettings(limits=LimitsConfig(max_prompt_chars=10)))
    resp = post(owner, {"model": "echo", "messages": [{"role": "system", "content": "x" * 8}, {"role": "user", "content": "yyyy"}]})
    assert resp.status_code == 413 and resp.json()["error"]["param"] == "messages" and resp.json()["error"]["code"] == "prompt_too_large"


@pytest.mark.django_db
def test_the_models_and_unknown_paths_need_nothing_but_json(owner: TenantFixture, anon: Any) -> None:
    assert anon.get("/v1/models").status_code == 401
    assert owner.client.get("/v1/models").json()["object"] == "list"
    missing = owner.client.get("/v1/embeddings")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_stop_forms_and_model_resolution() -> None:
    data = validated(ChatCompletionInput, {"model": "m", "messages": [{"role": "developer", "content": "d"}, {"role": "user", "content": "u"}], "stop": "END"})
    assert data.stop == ["END"] and [m.role for m in data.messages] == ["developer", "user"]
    config = PipelineSettings(
        workers={"a": WorkerConfig(kind="echo", models=["shared", "a1"]), "b": WorkerConfig(kind="echo", models=["shared"])}, default_worker="a"
    )
    with pytest.raises(UnknownModel) as ambiguous:
        openai_compat.resolve_model(config, "shared")  # two workers serve it: say which
    assert ambiguous.value.data["available"] == ["a/a1", "a/shared", "b/shared"]
    assert openai_compat.resolve_model(config, "a1") == ("a", "a1")


def test_a_clients_conversation_is_kept_whole() -> None:
    history = tuple(ChatMessage("user" if i % 2 == 0 else "assistant", f"turn {i}") for i in range(10))
    request = PromptRequest(request_id="r", tenant_id="t", session_id="s", prompt="now", worker="echo", model="echo-1", max_tokens=5, history=history)
    ctx = assemble(StageContext(request, history=history), config=AssembleConfig(history_turns=0, system_prompt="sys"))
    assert ctx.prompt is not None
    assert [m.content for m in ctx.prompt.messages] == ["sys", *[f"turn {i}" for i in range(10)], "now"]


def events_of(*items: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    async def gen() -> AsyncIterator[dict[str, Any]]:
        for item in items:
            yield item

    return gen()


def frames(response: Any) -> list[str]:
    async def drain() -> bytes:
        return b"".join([chunk async for chunk in response.streaming_content])

    return [f for f in async_to_sync(drain)().decode().split("\n\n") if f]


def test_chunks_without_usage_end_with_done() -> None:
    done = {"type": "done", "request_id": "r", "finish_reason": "length", "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    out = frames(
        openai_compat._chunk_stream(
            events_of({"type": "start", "request_id": "r"}, {"type": "token", "request_id": "r", "seq": 0, "text": "hi"}, done), "echo/echo-1", False
        )
    )
    assert out[-1] == "data: [DONE]"
    chunks = [json.loads(f.removeprefix("data: ")) for f in out[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant", "content": ""}, {"content": "hi"}, {}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and all("usage" not in c for c in chunks)
    assert chunks[-1]["sources"] == [] and all("sources" not in c for c in chunks[:-1])  # a done of an older worker has none


def test_a_crash_inside_the_chunk_stream_ends_it_with_an_error_chunk() -> None:
    async def broken() -> AsyncIterator[dict[str, Any]]:
        yield {"type": "start", "request_id": "r"}
        raise RuntimeError("bug")

    out = frames(openai_compat._chunk_stream(broken(), "echo/echo-1", True))
    assert json.loads(out[-1].removeprefix("data: "))["error"]["code"] == "internal_error"


@pytest.mark.django_db(transaction=True)
def test_a_completion_in_process_from_the_deduplication_window(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.types import PipelineResult, Usage

    original = streaming.prompt_events

    async def cached(request: Any, started: Any, *, timeout_s: float) -> AsyncIterator[dict[str, Any]]:
        result = PipelineResult(
            request_id="x", session_id="s", text="from the window", worker="echo", model="echo-1", finish_reason="stop", usage=Usage(1, 3), timings_us={}
        )
        async for event in original(request, type(started)(StartKind.CACHED, "x", result), timeout_s=timeout_s):
            yield event

    async def from_the_window(*, request: Any, rates: Any = None) -> Any:
        result = PipelineResult(
            request_id="x", session_id="s", text="from the window", worker="echo", model="echo-1", finish_reason="stop", usage=Usage(1, 3), timings_us={}
        )
        return start.Started(StartKind.CACHED, "x", result)

    monkeypatch.setattr(streaming, "prompt_events", cached)
    monkeypatch.setattr(start, "ainfer_start", from_the_window)

    async def call() -> Any:
        return await AsyncClient().post(
            CHAT,
            {"model": "echo", "messages": [{"role": "user", "content": "q"}]},
            content_type="application/json",
            headers={"Authorization": f"Bearer {owner.key}"},
        )

    resp = async_to_sync(call)()
    body = resp.json()
    assert resp.status_code == 200 and body["choices"][0]["message"]["content"] == "from the window" and body["usage"]["total_tokens"] == 4


@pytest.mark.django_db
def test_developer_messages_are_system_messages_and_the_rest_is_kept(owner: TenantFixture, fakes: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator_site.errors import ServiceUnavailable

    seen: list[PromptRequest] = []

    async def capture(*, request: PromptRequest, rates: Any = None) -> Any:
        seen.append(request)
        raise ServiceUnavailable("stop here")  # the request as built is all this test needs

    monkeypatch.setattr(start, "ainfer_start", capture)
    messages = [{"role": "developer", "content": "rules"}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]
    resp = post(owner, {"model": "openai/gpt-other", "messages": messages, "max_completion_tokens": 7, "stop": "END", "temperature": 0.2})
    assert resp.status_code == 503, resp.json()
    request = seen[0]
    assert [(m.role, m.content) for m in request.history] == [("system", "rules"), ("assistant", "hi")]
    assert (request.prompt, request.worker, request.model, request.max_tokens, request.stop, request.temperature) == (
        "q",
        "openai",
        "gpt-other",
        7,
        ("END",),
        0.2,
    )
