"""An answer says where it came from: the documents a RAG answer used, in rank order,
in /api/v1/infer's result, the WebSocket done event and /v1's completion (an extension
field), through a real worker."""

from __future__ import annotations

import json
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator

from orchestrator_site.asgi import application
from pipeline.services import documents
from tests.conftest import Fakes, TenantFixture, WorkerProcess
from tests.pipeline.test_openai_compat_edges import frames

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def sourced(owner: TenantFixture) -> list[str]:
    best = documents.document_create(tenant=owner.tenant, title="Refund policy", body="refunds are paid within 30 days of a refund request")
    other = documents.document_create(tenant=owner.tenant, title="Shipping", body="a refund of shipping costs is not paid")
    return [str(best.id), str(other.id)]


def test_the_infer_result_lists_the_documents_used(owner: TenantFixture, outsider: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes) -> None:
    ids = sourced(owner)
    result = owner.client.post("/api/v1/infer", {"prompt": "how is a refund paid"}, format="json").json()
    sources = result["sources"]
    assert [s["id"] for s in sources] == ids and [s["rank"] for s in sources] == [1, 2]
    assert sources[0]["title"] == "Refund policy" and sources[0]["score"] >= sources[1]["score"] > 0
    plain = outsider.client.post("/api/v1/infer", {"prompt": "how is a refund paid"}, format="json").json()
    assert plain["sources"] == []  # no documents, no sources
    assert owner.client.get(f"/api/v1/result/{result['request_id']}").json()["sources"] == sources


def test_the_openai_api_carries_them_as_an_extension(owner: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes) -> None:
    ids = sourced(owner)
    body = {"model": "echo", "messages": [{"role": "user", "content": "refund paid"}]}
    completion = owner.client.post("/v1/chat/completions", body, format="json").json()
    assert [s["id"] for s in completion["sources"]] == ids
    streamed = owner.client.post("/v1/chat/completions", {**body, "stream": True, "messages": [{"role": "user", "content": "refund paid?"}]}, format="json")
    chunks = [json.loads(frame[6:]) for frame in frames(streamed) if frame.startswith("data: {")]
    final = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert [s["id"] for s in final["sources"]] == ids


def test_the_websocket_done_event_carries_them(owner: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes) -> None:
    ids = sourced(owner)

    async def scenario() -> dict[str, Any]:
        ws = WebsocketCommunicator(application, "/api/v1/stream", headers=[(b"authorization", f"Bearer {owner.key}".encode())])
        await ws.connect(timeout=10)
        await ws.receive_from(timeout=10)  # authenticated
        await ws.send_to(text_data=json.dumps({"type": "prompt", "prompt": "refund paid"}))
        while (event := json.loads(await ws.receive_from(timeout=15)))["type"] not in ("done", "error"):
            pass
        await ws.disconnect()
        return event

    done = async_to_sync(scenario)()
    assert done["type"] == "done" and [s["id"] for s in done["sources"]] == ids
