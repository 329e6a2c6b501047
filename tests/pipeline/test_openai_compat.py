"""The OpenAI-compatible API, with the official ``openai`` SDK as the client, through
a real Daphne gateway and a real Celery worker."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from pipeline.api.openai_compat import model_ids, resolve_model
from pipeline.config import get_config
from pipeline.models import Tenant
from pipeline.resilience.dedup import dedup_key
from pipeline.tokenbus import get_bus
from pipeline.types import ChatMessage, PromptRequest
from tests.conftest import Fakes, TenantFixture, WorkerProcess, start_gateway, stop_process


@pytest.fixture(scope="module")
def gateway(realtime_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_gateway(tmp_path_factory.mktemp("openai") / "gateway.log")
    yield url
    stop_process(proc)


def client(gateway: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0, timeout=30)


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_models_lists_every_worker_and_model(gateway: str, owner: TenantFixture) -> None:
    ids = [m.id for m in client(gateway, owner.key).models.list()]
    assert ids == model_ids(get_config()) and "echo/echo-1" in ids and "openai/gpt-fake" in ids


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_completion_with_the_conversation(gateway: str, owner: TenantFixture, fakes: Fakes) -> None:
    completion = client(gateway, owner.key).chat.completions.create(
        model="openai/gpt-fake",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": [{"type": "text", "text": "second "}, {"type": "text", "text": "question"}]},
        ],
        max_tokens=20,
    )
    assert completion.choices[0].message.content == "Hello, world!" and completion.choices[0].finish_reason == "stop"
    assert completion.model == "openai/gpt-fake" and completion.usage.completion_tokens == 4  # type: ignore[union-attr]
    sent = fakes.openai.requests[-1]["body"]["messages"]
    assert [(m["role"], m["content"]) for m in sent][-4:] == [
        ("system", "be brief"),
        ("user", "first question"),
        ("assistant", "first answer"),
        ("user", "second question"),
    ]


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_streaming_with_usage(gateway: str, owner: TenantFixture, fakes: Fakes) -> None:
    stream = client(gateway, owner.key).chat.completions.create(
        model="openai", messages=[{"role": "user", "content": "stream it"}], stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello, world!"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4  # type: ignore[union-attr]
    assert len({c.id for c in chunks}) == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_errors_reach_the_sdk_as_its_exceptions(gateway: str, owner: TenantFixture, fakes: Fakes) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "po_00000000_not-a-key").chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as bad:
        client(gateway, owner.key).chat.completions.create(model="nope/none", messages=[{"role": "user", "content": "x"}])
    assert bad.value.code == "model_not_found" and bad.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client(gateway, owner.key).chat.completions.create(model="echo", messages=[{"role": "assistant", "content": "last is not the user's"}])
    fakes.openai.mode = "401"  # the provider refuses: a 502 for us
    with pytest.raises(openai.APIStatusError) as refused:
        client(gateway, owner.key).chat.completions.create(model="openai/gpt-fake", messages=[{"role": "user", "content": "x"}])
    assert refused.value.status_code == 502
    stream = client(gateway, owner.key).chat.completions.create(model="openai/gpt-fake", messages=[{"role": "user", "content": "x"}], stream=True)
    with pytest.raises(openai.APIError, match="credentials"):
        list(stream)  # the error arrives inside the stream


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_each_error_has_openais_shape_and_the_sdks_class(gateway: str, owner: TenantFixture, fakes: Fakes) -> None:
    """message, type, param, code: what the SDK reads into its exceptions."""
    sdk = client(gateway, owner.key)
    with pytest.raises(openai.AuthenticationError) as denied:
        client(gateway, "po_00000000_not-a-key").models.list()
    assert (denied.value.code, denied.value.type, denied.value.param) == ("invalid_api_key", "authentication_error", None)
    with pytest.raises(openai.BadRequestError) as unknown:
        sdk.chat.completions.create(model="nope/none", messages=[{"role": "user", "content": "x"}])
    assert (unknown.value.code, unknown.value.type, unknown.value.param) == ("model_not_found", "invalid_request_error", "model")
    with pytest.raises(openai.BadRequestError) as invalid:
        sdk.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}], temperature=3)
    assert (invalid.value.code, invalid.value.param) == ("invalid_request", "temperature") and "temperature" in invalid.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.models.retrieve("no-such-model")
    assert (missing.value.code, missing.value.type) == ("not_found", "not_found_error")
    fakes.openai.mode = "503"
    with pytest.raises(openai.InternalServerError) as down:
        sdk.chat.completions.create(model="openai/gpt-fake", messages=[{"role": "user", "content": "x"}])
    assert (down.value.status_code, down.value.type) == (503, "server_error") and down.value.code in ("worker_unavailable", "circuit_open")
    assert set(down.value.body) == {"message", "type", "param", "code"}  # type: ignore[arg-type]
    fakes.openai.mode = "401"
    stream = sdk.chat.completions.create(model="openai/gpt-fake", messages=[{"role": "user", "content": "y"}], stream=True)
    with pytest.raises(openai.APIError) as broken:
        list(stream)
    assert (broken.value.code, broken.value.type) == ("worker_auth_error", "server_error")


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_rate_limits_are_the_sdks_rate_limit_error(gateway: str, owner: TenantFixture) -> None:
    Tenant.objects.filter(pk=owner.tenant.pk).update(requests_per_minute=1)
    bus = get_bus()
    try:
        sdk = client(gateway, owner.key)
        sdk.chat.completions.create(model="echo", messages=[{"role": "user", "content": "one"}])
        with pytest.raises(openai.RateLimitError) as limited:
            sdk.chat.completions.create(model="echo", messages=[{"role": "user", "content": "two"}])
        assert (limited.value.code, limited.value.type) == ("rate_limit_exceeded", "rate_limit_error")
        assert int(limited.value.response.headers["retry-after"]) >= 1
    finally:
        keys = bus.redis.client.keys(f"{bus.prefix}:rate:*")
        if keys:
            bus.redis.client.delete(*keys)


def test_model_names_resolve_three_ways() -> None:
    config = get_config()
    assert resolve_model(config, "openai/gpt-other") == ("openai", "gpt-other")
    assert resolve_model(config, "echo") == ("echo", "echo-1")
    assert resolve_model(config, "echo-1") == ("echo", "echo-1")  # served by one worker only


def test_conversations_are_part_of_the_dedup_key() -> None:
    base = PromptRequest(request_id="r", tenant_id="t", session_id="s", prompt="and then?", worker="echo", model="echo-1", max_tokens=8)
    one = PromptRequest(**{**base.__dict__, "history": (ChatMessage("user", "tell me about cats"),)})
    two = PromptRequest(**{**base.__dict__, "history": (ChatMessage("user", "tell me about dogs"),)})
    assert len({dedup_key(base), dedup_key(one), dedup_key(two)}) == 3
    assert PromptRequest.from_dict(one.to_dict()) == one  # the conversation crosses into the task
