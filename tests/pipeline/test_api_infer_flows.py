"""More end-to-end flows through the real worker process."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from pipeline.auth import api_key_revoke
from pipeline.tokenbus import get_bus
from tests.conftest import Fakes, TenantFixture, WorkerProcess

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture(autouse=True)
def _worker(realtime_worker: WorkerProcess, fakes: Fakes) -> None:
    """Every test here runs against the real worker process and the fakes."""


def post(tenant: TenantFixture, **body: object) -> httpx.Response:
    return tenant.client.post("/api/v1/infer", body, format="json")  # type: ignore[return-value]


def test_given_session_id_is_kept(owner: TenantFixture) -> None:
    body = post(owner, prompt="hi", session_id="user-42:chat.1").json()
    assert body["session_id"] == "user-42:chat.1" and body["request_id"] != body["session_id"]


def test_unicode_round_trips(owner: TenantFixture) -> None:
    body = post(owner, prompt="héllo 世界 🚀").json()
    assert body["text"].split()[:3] == ["héllo", "世界", "🚀"]


def test_prompt_exactly_at_the_limit_is_accepted(owner: TenantFixture) -> None:
    resp = post(owner, prompt="y" * 2000)
    assert resp.status_code == 200 and resp.json()["text"].startswith("y" * 2000)


def test_a_whole_answers_stream_holds_its_done_event_alone(owner: TenantFixture) -> None:
    body = post(owner, prompt="answer me whole").json()
    events = get_bus().read_all(body["request_id"])
    assert [e.type for e in events] == ["done"] and events[0].data == body  # one write, not one per token


def test_same_session_id_in_two_tenants_stays_apart(owner: TenantFixture, outsider: TenantFixture, fakes: Fakes) -> None:
    post(owner, prompt="owner secret plan", worker="openai", session_id="shared")
    post(outsider, prompt="outsider question", worker="openai", session_id="shared")
    sent = fakes.openai.requests[-1]["body"]["messages"]
    assert [m["content"] for m in sent if m["role"] != "system"] == ["outsider question"]


def test_revoked_key_stops_working_between_requests(owner: TenantFixture) -> None:
    assert post(owner, prompt="first").status_code == 200
    api_key_revoke(api_key=owner.issued.api_key)
    resp = post(owner, prompt="second")
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "api_key_revoked"


def test_documents_deleted_are_no_longer_retrieved(owner: TenantFixture, fakes: Fakes) -> None:
    doc = owner.client.post("/api/v1/documents", {"title": "Warranty", "body": "Two year warranty on all parts."}, format="json").json()
    post(owner, prompt="warranty length?", worker="openai")
    assert "Two year warranty" in fakes.openai.requests[-1]["body"]["messages"][0]["content"]
    owner.client.delete(f"/api/v1/documents/{doc['id']}")
    post(owner, prompt="warranty length?", worker="openai")
    assert "Two year warranty" not in fakes.openai.requests[-1]["body"]["messages"][0]["content"]


def test_connection_refused_upstream_is_a_502(owner: TenantFixture, fakes: Fakes) -> None:
    fakes.llamacpp.mode = "hang"
    fakes.llamacpp.hang_s = 0.0  # accept, then close without answering
    resp = post(owner, prompt="hi", worker="llamacpp")
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "worker_connection_error"


def test_concurrent_requests_through_the_asgi_app(owner: TenantFixture) -> None:
    from orchestrator_site.asgi import application

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers={"Authorization": f"Bearer {owner.key}"}, timeout=30) as client:
            return await asyncio.gather(*(client.post("/api/v1/infer", json={"prompt": f"n{i}"}) for i in range(12)))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 12
    assert sorted(r.json()["text"].split()[0] for r in responses) == sorted(f"n{i}" for i in range(12))
    assert len({r.json()["request_id"] for r in responses}) == 12
