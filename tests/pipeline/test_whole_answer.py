"""A client that waits for the whole answer (``"stream": false``): its run publishes
the answer once, in the done event, not token by token; it still stops when nobody
waits any more; and a streaming client attached to it gets the answer as one token."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator

from orchestrator_site.asgi import application
from pipeline.config import get_config
from pipeline.services import execute, gates, start
from pipeline.tokenbus import get_bus
from pipeline.types import PromptRequest
from tests.conftest import Fakes, TenantFixture, WorkerProcess, run_in_process

pytestmark = pytest.mark.django_db(transaction=True)

REPLY = [f"w{i} " for i in range(20)]


def request_of(owner: TenantFixture, *, stream: bool, prompt: str = "whole or streamed") -> PromptRequest:
    config = get_config()
    request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": prompt, "worker": "openai"}, config=config, stream=stream)
    assert gates.admission(config).acquire(request.tenant_id, request.request_id).admitted
    return request


def test_the_stream_field_travels_with_the_request() -> None:
    request = PromptRequest(request_id="r", tenant_id="t", session_id="s", prompt="p", worker="echo", model="echo-1", max_tokens=8, stream=False)
    assert PromptRequest.from_dict(request.to_dict()).stream is False
    assert PromptRequest.from_dict({**request.to_dict(), "stream": True}).stream is True
    legacy = request.to_dict()
    del legacy["stream"]  # a request queued before the field existed streams, as it did
    assert PromptRequest.from_dict(legacy).stream is True


@pytest.mark.parametrize("stream", [True, False])
def test_a_whole_answer_is_published_once_a_streamed_one_as_it_comes(owner: TenantFixture, fakes: Fakes, stream: bool) -> None:
    fakes.openai.tokens = REPLY
    request = request_of(owner, stream=stream)
    run_in_process(request)
    events = get_bus().read_all(request.request_id)
    streamed = "".join(str(e.data["text"]) for e in events if e.type == "token")
    assert streamed == ("".join(REPLY).strip() if stream else "")  # in bursts, or not at all
    done = events[-1]
    assert done.type == "done" and done.data["text"] == "".join(REPLY).strip()
    assert done.data["usage"]["completion_tokens"] == len(REPLY)  # counted all the same


def test_a_whole_answer_nobody_waits_for_stops_its_upstream_call(owner: TenantFixture, fakes: Fakes) -> None:
    fakes.openai.tokens, fakes.openai.token_delay_s = REPLY * 3, 0.05  # 3 s of reply
    request = request_of(owner, stream=False, prompt="nobody waits")
    bus = get_bus()
    bus.redis.client.zadd(bus.readers_key(request.request_id), {"gone-reader": float("-inf")})  # its only reader signed out
    began = time.monotonic()
    run_in_process(request)
    took = time.monotonic() - began
    last = bus.read_all(request.request_id)[-1]
    assert (last.type, last.data["code"]) == ("error", "request_cancelled")
    assert took < execute.WANTED_EVERY_S + 1.0, took  # asked within a quarter second of tokens, not after 3 s
    deadline = time.monotonic() + 2
    while not fakes.openai.client_aborts and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fakes.openai.client_aborts, "the provider's connection was left open"


async def _stream_client(key: str, prompt: str) -> list[dict[str, Any]]:
    ws = WebsocketCommunicator(application, "/api/v1/stream", headers=[(b"authorization", f"Bearer {key}".encode())])
    connected, _ = await ws.connect(timeout=10)
    assert connected and json.loads(await ws.receive_from(timeout=10))["type"] == "authenticated"
    await ws.send_to(text_data=json.dumps({"type": "prompt", "prompt": prompt, "worker": "openai"}))
    events: list[dict[str, Any]] = []
    while not events or events[-1]["type"] not in ("done", "error"):
        events.append(json.loads(await ws.receive_from(timeout=15)))
    await ws.disconnect()
    return events


@pytest.mark.slow
def test_over_http_a_whole_answer_writes_no_tokens_and_a_streaming_twin_gets_it_as_one(
    owner: TenantFixture, fakes: Fakes, realtime_worker: WorkerProcess, dedup_on: object
) -> None:
    fakes.openai.tokens, fakes.openai.token_delay_s = REPLY, 0.03
    calls = len(fakes.openai.requests)
    queued = owner.client.post("/api/v1/infer", {"prompt": "shared whole answer", "worker": "openai", "wait": False}, format="json")
    assert queued.status_code == 202, queued.json()

    async def attach() -> list[dict[str, Any]]:
        await asyncio.sleep(0.1)  # in flight: the streaming twin attaches to it
        return await _stream_client(owner.key, "shared whole answer")

    events = async_to_sync(attach)()
    assert len(fakes.openai.requests) == calls + 1  # one upstream call for both
    tokens = [e for e in events if e["type"] == "token"]
    assert [(t["seq"], t["text"]) for t in tokens] == [(0, "".join(REPLY).strip())]
    assert events[-1]["type"] == "done" and events[-1]["usage"]["completion_tokens"] == len(REPLY)
    owner_events = get_bus().read_all(queued.json()["request_id"])
    assert [e.type for e in owner_events if e.type in ("token", "done")] == ["done"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/api/v1/infer", {"prompt": "rendered here"}, 200),
        ("/api/v1/infer", {"prompt": "rendered here, later", "wait": False}, 202),
        ("/v1/chat/completions", {"model": "echo", "messages": [{"role": "user", "content": "rendered here"}]}, 200),
    ],
)
def test_a_whole_answer_leaves_nothing_for_djangos_handler_to_render(
    owner: TenantFixture, realtime_worker: WorkerProcess, path: str, body: dict[str, Any], status: int
) -> None:
    # Django renders a response that has ``render`` (a DRF Response) in a thread of
    # the request's own, after the view: a hop on the way to the answer.
    resp = owner.client.post(path, body, format="json")
    assert resp.status_code == status, resp.content
    assert not hasattr(resp, "render") and resp["Content-Type"] == "application/json"
    assert json.loads(resp.content) == resp.json() and ("request_id" in resp.json() or "choices" in resp.json())
