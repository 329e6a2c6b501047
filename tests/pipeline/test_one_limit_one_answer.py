"""One limit, one answer on every endpoint: a prompt over the limit is 413
``prompt_too_large`` everywhere, ``max_tokens`` over the limit names the configured
limit, a prompt that is not a string is refused, ``x-api-key`` is a key like a
bearer token, and times on ``/api/v1/*`` are ISO 8601 UTC."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from rest_framework.test import APIClient

from orchestrator_site.asgi import application
from pipeline.config import LimitsConfig, PipelineSettings
from pipeline.tokenbus import get_bus
from tests.conftest import TenantFixture

LIMIT = 10
CHAT = "/v1/chat/completions"


@pytest.fixture
def small_limit(pipeline_config: Any) -> None:
    pipeline_config(PipelineSettings(limits=LimitsConfig(max_prompt_chars=LIMIT)))


def chat(prompt: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": prompt}], **extra}


@pytest.mark.django_db
def test_a_prompt_over_the_limit_is_413_on_every_single_prompt_endpoint(owner: TenantFixture, small_limit: None) -> None:
    infer = owner.client.post("/api/v1/infer", {"prompt": "x" * (LIMIT + 1)}, format="json")
    assert infer.status_code == 413 and infer.json()["error"]["code"] == "prompt_too_large"
    completion = owner.client.post(CHAT, chat("x" * (LIMIT + 1)), format="json")
    assert completion.status_code == 413
    assert completion.json()["error"] == {
        "message": f"the messages are longer than {LIMIT} characters",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "prompt_too_large",
    }


@pytest.mark.django_db(transaction=True)
def test_a_websocket_prompt_over_the_limit_is_prompt_too_large(owner: TenantFixture, small_limit: None) -> None:
    async def scenario() -> dict[str, Any]:
        ws = WebsocketCommunicator(application, "/api/v1/stream", headers=[(b"authorization", f"Bearer {owner.key}".encode())])
        connected, _ = await ws.connect(timeout=10)
        assert connected and json.loads(await ws.receive_from(timeout=10))["type"] == "authenticated"
        await ws.send_to(text_data=json.dumps({"type": "prompt", "prompt": "x" * (LIMIT + 1)}))
        event = json.loads(await ws.receive_from(timeout=10))
        await ws.disconnect()
        return event

    event = async_to_sync(scenario)()
    assert event["type"] == "error" and event["code"] == "prompt_too_large"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/infer", {"prompt": "x", "max_tokens": 2_000_000}, "max_tokens"),
        ("/api/v1/infer", {"prompt": "x", "max_tokens": 4097}, "max_tokens"),
        (CHAT, chat("x", max_tokens=2_000_000), "max_tokens"),
        (CHAT, chat("x", max_completion_tokens=5000), "max_completion_tokens"),
        ("/api/v1/batch", {"prompts": ["x"], "max_tokens": 2_000_000}, "max_tokens"),
    ],
)
def test_max_tokens_over_the_limit_names_the_configured_limit(owner: TenantFixture, path: str, body: dict[str, Any], field: str) -> None:
    resp = owner.client.post(path, body, format="json")
    error = resp.json()["error"]
    assert resp.status_code == 400
    if path == CHAT:
        assert error["param"] == field and error["message"] == f"{field}: may be at most 4096 (limits.max_tokens_limit)"
    else:
        assert error["data"]["fields"][field] == ["may be at most 4096 (limits.max_tokens_limit)"]
    assert "1000000" not in json.dumps(error)


@pytest.mark.django_db
def test_max_tokens_at_the_limit_is_accepted(owner: TenantFixture) -> None:
    resp = owner.client.post("/api/v1/infer", {"prompt": "x", "max_tokens": 4096, "wait": False}, format="json")
    assert resp.status_code == 202, resp.content


@pytest.mark.django_db
@pytest.mark.parametrize("prompt", [42, 4.5, True, ["a"], {"text": "a"}])
def test_a_prompt_that_is_not_a_string_is_refused_everywhere(owner: TenantFixture, prompt: Any) -> None:
    infer = owner.client.post("/api/v1/infer", {"prompt": prompt}, format="json")
    assert infer.status_code == 400 and infer.json()["error"]["data"]["fields"]["prompt"] == ["Not a valid string."]
    completion = owner.client.post(CHAT, chat(prompt), format="json")
    assert completion.status_code == 400 and completion.json()["error"]["param"] == "messages"
    batch = owner.client.post("/api/v1/batch", {"prompts": [prompt]}, format="json")
    assert batch.status_code == 400 and batch.json()["error"]["data"]["fields"]["prompts"] == ['item 0: must be a string or {"prompt": ..., "custom_id": ...}']
    wrapped = owner.client.post("/api/v1/batch", {"prompts": [{"prompt": prompt}]}, format="json")
    assert wrapped.status_code == 400 and wrapped.json()["error"]["data"]["fields"]["prompts"] == ["item 0: prompt must be a non-empty string"]
    assert max_tokens_is_strict(owner)


def max_tokens_is_strict(owner: TenantFixture) -> bool:
    """Numbers are not read out of strings, nor out of booleans."""
    return all(owner.client.post("/api/v1/infer", {"prompt": "x", "max_tokens": v}, format="json").status_code == 400 for v in ("5", True, 5.0))


@pytest.mark.django_db
def test_x_api_key_is_a_key_as_a_bearer_token_is(owner: TenantFixture, outsider: TenantFixture) -> None:
    client = APIClient()
    assert client.get("/api/v1/documents", HTTP_X_API_KEY=owner.key).status_code == 200
    assert client.get("/v1/models", HTTP_X_API_KEY=owner.key).status_code == 200
    bad = client.get("/api/v1/documents", HTTP_X_API_KEY="po_00000000_not-a-key")
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "api_key_invalid"
    empty = client.get("/api/v1/documents", HTTP_X_API_KEY="  ")
    assert empty.status_code == 401 and empty.json()["error"]["message"] == "x-api-key is empty"
    both = client.get("/api/v1/batch", HTTP_AUTHORIZATION=f"Bearer {outsider.key}", HTTP_X_API_KEY=owner.key)
    assert both.status_code == 200  # the bearer token wins: the outsider's (empty) list, not the owner's


@pytest.mark.django_db(transaction=True)
def test_a_websocket_authenticates_with_x_api_key(owner: TenantFixture) -> None:
    async def scenario() -> dict[str, Any]:
        ws = WebsocketCommunicator(application, "/api/v1/stream", headers=[(b"x-api-key", owner.key.encode())])
        connected, _ = await ws.connect(timeout=10)
        assert connected
        event = json.loads(await ws.receive_from(timeout=10))
        await ws.disconnect()
        return event

    assert async_to_sync(scenario)() == {"type": "authenticated", "tenant_id": str(owner.tenant.id)}


@pytest.mark.django_db
def test_request_status_times_are_iso_8601_utc(owner: TenantFixture) -> None:
    bus = get_bus()
    bus.set_record("iso-times", tenant_id=str(owner.tenant.id), session_id="s", status="queued", created_at="1796630400.25")
    body = owner.client.get("/api/v1/status/iso-times").json()
    assert body["created_at"] == "2026-12-07T08:00:00.250000+00:00"
    assert dt.datetime.fromisoformat(body["updated_at"]).tzinfo == dt.UTC
    bus.set_record("no-times", tenant_id=str(owner.tenant.id), session_id="s", status="queued")
    bus.redis.client.hdel(bus.record_key("no-times"), "updated_at")
    assert owner.client.get("/api/v1/status/no-times").json()["created_at"] is None
