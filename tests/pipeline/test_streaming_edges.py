"""The streaming transports' edges: oversized and binary messages, refusals that
name their request, the per-connection cap, crashes that stay inside their
boundary (a stream, the consumer, the SSE body), and leaving mid-stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.test import AsyncClient

from orchestrator_site.asgi import application
from orchestrator_site.errors import Overloaded
from pipeline import consumers, streaming
from pipeline.models import Tenant
from pipeline.services import gates, start
from pipeline.tokenbus import get_bus
from tests.conftest import TenantFixture
from tests.pipeline.test_streaming_ws import STREAM, connect, receive, until_end

pytestmark = [pytest.mark.django_db(transaction=True)]


def run(scenario: Any) -> Any:
    return async_to_sync(scenario)()


def test_oversized_and_binary_messages(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumers, "MAX_MESSAGE_BYTES", 64)

    async def scenario() -> list[dict[str, Any]]:
        ws = await connect(owner.key)
        await ws.send_to(text_data=json.dumps({"type": "prompt", "prompt": "x" * 100}))
        too_big = await receive(ws)
        await ws.send_to(bytes_data=b"\xff\xfe not json")
        binary = await receive(ws)
        await ws.disconnect()
        return [too_big, binary]

    too_big, binary = run(scenario)
    assert too_big["code"] == "prompt_too_large" and binary["code"] == "invalid_request"


def test_a_refused_prompt_names_its_request(owner: TenantFixture) -> None:
    from pipeline.resilience.ratelimit import TenantRates

    Tenant.objects.filter(pk=owner.tenant.pk).update(requests_per_minute=1)
    bus = get_bus()
    assert gates.rate_limiter().check(str(owner.tenant.id), "earlier", TenantRates(requests_per_minute=1)).allowed  # the minute's one request

    async def scenario() -> dict[str, Any]:
        ws = await connect(owner.key)
        await ws.send_to(text_data=json.dumps({"type": "prompt", "prompt": "limited"}))
        refused = await receive(ws)
        await ws.disconnect()
        return refused

    try:
        refused = run(scenario)
    finally:
        keys = bus.redis.client.keys(f"{bus.prefix}:rate:*")
        if keys:
            bus.redis.client.delete(*keys)
    assert refused["type"] == "error" and refused["code"] == "rate_limited" and refused["request_id"] and refused["data"]["limit"] == 1


def test_a_connection_holds_at_most_its_cap_of_streams() -> None:
    consumer = consumers.StreamConsumer()
    consumer.streams = {}

    async def fill() -> None:
        never = asyncio.get_running_loop().create_future()
        consumer.streams = {str(i): asyncio.ensure_future(asyncio.shield(never)) for i in range(consumers.MAX_STREAMS_PER_CONNECTION)}
        with pytest.raises(Overloaded):
            consumer.room_for_one_more()
        done = asyncio.ensure_future(asyncio.sleep(0))
        await done
        consumer.streams["0"].cancel()
        await asyncio.sleep(0)
        consumer.room_for_one_more()  # a finished stream makes room
        assert len(consumer.streams) == consumers.MAX_STREAMS_PER_CONNECTION - 1
        for task in consumer.streams.values():
            task.cancel()

    async_to_sync(fill)()


def test_a_crash_in_the_consumer_or_a_stream_stays_inside(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    real = start.infer_build_request

    def broken_build(**kwargs: Any) -> Any:
        if kwargs["data"]["prompt"] == "crash":
            raise RuntimeError("bug")
        return real(**kwargs)

    async def broken_stream(*args: Any, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        yield {"type": "start", "request_id": "r-broken"}
        raise RuntimeError("bug in a stream")

    monkeypatch.setattr(start, "infer_build_request", broken_build)

    async def scenario() -> list[dict[str, Any]]:
        ws = await connect(owner.key)
        await ws.send_to(text_data=json.dumps({"type": "prompt", "prompt": "crash"}))
        out = [await receive(ws)]
        monkeypatch.setattr(streaming, "prompt_events", broken_stream)
        await ws.send_to(text_data=json.dumps({"type": "prompt", "prompt": "fine", "wait": False}))
        out += [await receive(ws), await receive(ws)]
        await ws.disconnect()
        return out

    crashed, began, ended = run(scenario)
    assert crashed == {"type": "error", "request_id": None, "code": "internal_error", "message": "internal error", "data": {}}
    assert began["type"] == "start" and ended["type"] == "error" and ended["code"] == "internal_error"
    assert ended["request_id"] and ended["request_id"] != "r-broken"  # the stream's own request, as the consumer knows it


def test_leaving_mid_stream_cancels_the_reader(owner: TenantFixture) -> None:
    async def scenario() -> bool:
        ws = WebsocketCommunicator(application, STREAM, headers=[(b"authorization", f"Bearer {owner.key}".encode())])
        await ws.connect(timeout=10)
        await receive(ws)
        # Nothing will answer this request (no worker is needed): its reader waits on the bus.
        await ws.send_to(text_data=json.dumps({"type": "resume", "request_id": await _queued_request(owner)}))
        await asyncio.sleep(0.2)
        tasks_before = len([t for t in asyncio.all_tasks() if "pump" in repr(t.get_coro())])
        await ws.disconnect()
        await asyncio.sleep(0.2)
        tasks_after = len([t for t in asyncio.all_tasks() if "pump" in repr(t.get_coro())])
        return tasks_before == 1 and tasks_after == 0

    assert run(scenario)


async def _queued_request(owner: TenantFixture) -> str:
    rid = "queued-" + owner.tenant.id.hex
    get_bus().set_record(rid, tenant_id=str(owner.tenant.id), session_id=rid, status="queued")
    return rid


def test_a_crash_inside_the_sse_body_ends_it_with_an_error_event(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*args: Any, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        yield {"type": "start", "request_id": "r"}
        raise RuntimeError("bug")

    monkeypatch.setattr(streaming, "prompt_events", broken)

    async def scenario() -> tuple[int, str]:
        resp = await AsyncClient().post(
            "/api/v1/infer", {"prompt": "p", "stream": True, "wait": False}, content_type="application/json", headers={"Authorization": f"Bearer {owner.key}"}
        )
        body = b"".join([chunk async for chunk in resp.streaming_content]).decode()  # type: ignore[attr-defined]
        return resp.status_code, body

    status, body = run(scenario)
    frames = body.strip().split("\n\n")
    assert status == 200 and frames[0].startswith("event: start") and frames[-1].startswith("event: error")
    assert json.loads(frames[-1].split("data: ", 1)[1])["code"] == "internal_error"


def test_a_stream_ended_by_timeout_or_done_is_complete(owner: TenantFixture) -> None:
    async def scenario() -> list[dict[str, Any]]:
        ws = await connect(owner.key)
        rid = await _queued_request(owner)
        bus = get_bus()
        bus.append(rid, "token", {"seq": 0, "text": "a"})
        bus.append(rid, "done", {"request_id": rid, "session_id": rid, "text": "a", "worker": "echo", "model": "echo-1"})
        await ws.send_to(text_data=json.dumps({"type": "resume", "request_id": rid, "after_seq": -1}))
        events = await until_end(ws, {rid})
        await ws.disconnect()
        return events

    events = run(scenario)
    assert [e["type"] for e in events] == ["token", "done"] and events[-1]["worker"] == "echo"


def test_an_authorization_header_of_another_scheme_is_refused() -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        ws = WebsocketCommunicator(application, STREAM, headers=[(b"authorization", b"Basic dXNlcjpwYXNz")])
        await ws.connect(timeout=10)
        return await receive(ws), await ws.receive_output(timeout=5)

    error, closed = run(scenario)
    assert error["code"] == "api_key_invalid" and "Bearer" in error["message"]
    assert closed == {"type": "websocket.close", "code": 4401}


def test_a_request_run_here_that_fails_streams_start_then_its_error(owner: TenantFixture, fakes: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.config import get_config

    request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "p", "worker": "openai"}, config=get_config())
    fakes.openai.mode = "401"

    async def drain() -> list[dict[str, Any]]:
        return [e async for e in streaming.prompt_events(request, start.Started(start.StartKind.LOCAL, request.request_id), timeout_s=1)]

    events = run(drain)
    assert [e["type"] for e in events] == ["start", "error"] and events[1]["code"] == "worker_auth_error"
    assert events[1]["request_id"] == request.request_id
