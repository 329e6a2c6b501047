"""A WebSocket prompt may carry the client's own ``id``: every event about it echoes it,
the error refusing an invalid prompt included, so a client with several prompts in
flight can tell which one failed before it has a ``request_id``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator

from orchestrator_site.asgi import application
from orchestrator_site.errors import InvalidRequest
from pipeline.consumers import client_id, tagged
from tests.conftest import Fakes, TenantFixture, WorkerProcess


async def connect(key: str) -> WebsocketCommunicator:
    ws = WebsocketCommunicator(application, "/api/v1/stream", headers=[(b"authorization", f"Bearer {key}".encode())])
    connected, _ = await ws.connect(timeout=10)
    assert connected and json.loads(await ws.receive_from(timeout=10))["type"] == "authenticated"
    return ws


async def receive(ws: WebsocketCommunicator) -> dict[str, Any]:
    return json.loads(await ws.receive_from(timeout=15))


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_every_event_of_a_prompt_echoes_its_id(owner: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes) -> None:
    async def scenario() -> list[dict[str, Any]]:
        ws = await connect(owner.key)
        await ws.send_to(text_data=json.dumps({"type": "prompt", "id": "first", "prompt": "one two"}))
        await ws.send_to(text_data=json.dumps({"type": "prompt", "id": 7, "prompt": ""}))  # refused: no prompt
        await ws.send_to(text_data=json.dumps({"type": "prompt", "prompt": "no id here"}))
        events: list[dict[str, Any]] = []
        ended: set[str] = set()
        while len(ended) < 2:
            event = await receive(ws)
            events.append(event)
            if event["type"] in ("done", "error") and event.get("request_id"):
                ended.add(event["request_id"])
        await ws.disconnect()
        return events

    events = async_to_sync(scenario)()
    refused = [e for e in events if e["type"] == "error"]
    assert refused == [{**refused[0], "id": 7}] and refused[0]["request_id"] is None and refused[0]["code"] == "prompt_missing"
    first = [e for e in events if e.get("id") == "first"]
    assert first[0]["type"] == "start" and first[-1]["type"] == "done" and len({e["request_id"] for e in first}) == 1
    unnamed = [e for e in events if e.get("request_id") not in (None, first[0]["request_id"])]
    assert unnamed and all("id" not in e for e in unnamed)


@pytest.mark.django_db(transaction=True)
def test_an_invalid_id_is_refused_and_the_connection_stays(owner: TenantFixture) -> None:
    async def scenario() -> list[dict[str, Any]]:
        ws = await connect(owner.key)
        await ws.send_to(text_data=json.dumps({"type": "prompt", "id": {"nested": 1}, "prompt": "x"}))
        first = await receive(ws)
        await ws.send_to(text_data=json.dumps({"type": "resume", "id": "r-1"}))  # resume without a request_id
        second = await receive(ws)
        await ws.disconnect()
        return [first, second]

    bad_id, bad_resume = async_to_sync(scenario)()
    assert bad_id["code"] == "invalid_request" and bad_id["data"] == {"field": "id"} and "id" not in bad_id
    assert bad_resume["code"] == "invalid_request" and bad_resume["id"] == "r-1"


@pytest.mark.parametrize("value", ["a", "x" * 128, 0, -5, 10**12])
def test_ids_the_client_may_use(value: object) -> None:
    assert client_id({"id": value}) == value


@pytest.mark.parametrize("value", ["", "x" * 129, True, 1.5, [1], {"a": 1}])
def test_ids_that_are_refused(value: object) -> None:
    with pytest.raises(InvalidRequest):
        client_id({"id": value})


def test_an_event_is_tagged_only_when_the_client_named_its_message() -> None:
    assert tagged({"type": "start"}, None) == {"type": "start"}
    assert tagged({"type": "start"}, 3) == {"type": "start", "id": 3} and client_id({}) is None
