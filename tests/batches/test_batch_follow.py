"""A job's results followed live, in this process against the real Postgres: the
cursor that sends items finishing out of index order once each; the WebSocket's
``batch_follow`` and ``/results?follow=true`` through the ASGI application, each
line arriving as its item finishes (chunks run from another thread meanwhile)
and the stream ending with the job; and the refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from asgiref.testing import ApplicationCommunicator
from channels.testing import WebsocketCommunicator
from django.db import connection

from batches import destinations, follow, services
from batches.follow import Cursor
from batches.models import BatchJob
from batches.services import Prompt, batch_cancel, batch_create, batch_results, batch_run_chunk
from orchestrator_site.asgi import application
from orchestrator_site.errors import InvalidRequest
from pipeline.config import get_config
from tests.batches.test_batch_api import ndjson
from tests.conftest import TenantFixture, make_tenant


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(follow, "POLL_S", 0.05)
    yield


def job_of(owner: TenantFixture, count: int) -> BatchJob:
    prompts = [Prompt(f"line {i}", f"c-{i}") for i in range(count)]
    return batch_create(tenant=owner.tenant, data={"prompts": prompts, "worker": "echo"}, config=get_config())


def indexes(rows: list[dict[str, Any]]) -> list[int]:
    return [row["index"] for row in rows]


@pytest.mark.django_db
def test_the_cursor_sends_items_that_finish_late_once_each(owner: TenantFixture, queued: list[Any]) -> None:
    job = job_of(owner, 8)
    cursor = Cursor()
    assert cursor.next_page(job) == []
    batch_run_chunk(job_id=str(job.id), first=4, last=6)
    assert indexes(cursor.next_page(job)) == [4, 5, 6]
    assert (cursor.high, cursor.holes) == (6, {0, 1, 2, 3})
    assert cursor.next_page(job) == []  # nothing new: nothing again
    batch_run_chunk(job_id=str(job.id), first=1, last=2)
    batch_run_chunk(job_id=str(job.id), first=7, last=7)
    assert indexes(cursor.next_page(job)) == [1, 2, 7]  # the late ones, then the new
    assert cursor.holes == {0, 3}
    batch_run_chunk(job_id=str(job.id), first=0, last=3)
    assert indexes(cursor.next_page(job)) == [0, 3] and cursor.holes == set()
    assert cursor.next_page(job) == []
    everything = batch_results(job=job, after=-1, limit=10)
    assert indexes(everything) == list(range(8))


@pytest.mark.django_db
def test_a_page_takes_the_late_items_first_up_to_its_limit(owner: TenantFixture, queued: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(follow, "HOLES_PER_QUERY", 2)  # the holes asked for two at a time
    job = job_of(owner, 10)
    cursor = Cursor()
    batch_run_chunk(job_id=str(job.id), first=6, last=9)
    assert indexes(cursor.next_page(job, limit=3)) == [6, 7, 8]
    batch_run_chunk(job_id=str(job.id), first=0, last=5)
    assert indexes(cursor.next_page(job, limit=3)) == [0, 1, 2]
    assert indexes(cursor.next_page(job, limit=4)) == [3, 4, 5, 9]
    assert cursor.next_page(job, limit=3) == [] and (cursor.high, cursor.holes) == (9, set())
    after = Cursor(high=7)  # resumed after index 7: the items up to it are not followed
    assert indexes(after.next_page(job)) == [8, 9]


async def ws_connect(key: str) -> WebsocketCommunicator:
    ws = WebsocketCommunicator(application, "/api/v1/stream", headers=[(b"authorization", f"Bearer {key}".encode())])
    connected, _ = await ws.connect(timeout=10)
    assert connected and json.loads(await ws.receive_from(timeout=10))["type"] == "authenticated"
    return ws


def in_a_thread(call: Any, **arguments: Any) -> Any:
    """``call`` in a thread of its own, as another process's worker would record items;
    its database connection closed after."""

    def closing() -> Any:
        try:
            return call(**arguments)
        finally:
            connection.close()

    return sync_to_async(closing, thread_sensitive=False)()


def run(job: BatchJob, first: int, last: int) -> Any:
    return in_a_thread(batch_run_chunk, job_id=str(job.id), first=first, last=last)


@pytest.mark.django_db(transaction=True)
def test_a_websocket_follower_gets_each_item_as_it_finishes_then_the_end(owner: TenantFixture, queued: list[Any], quick: None) -> None:
    job = job_of(owner, 6)

    async def scenario() -> list[list[dict[str, Any]]]:
        ws = await ws_connect(owner.key)
        await ws.send_to(text_data=json.dumps({"type": "batch_follow", "id": "f1", "job_id": str(job.id)}))
        rounds = []
        for first, last in ((3, 5), (0, 1), (2, 2)):
            assert await ws.receive_nothing(timeout=0.3)  # nothing until an item finishes
            await run(job, first, last)
            rounds.append([json.loads(await ws.receive_from(timeout=10)) for _ in range(last - first + 1)])
        rounds.append([json.loads(await ws.receive_from(timeout=10))])
        await ws.disconnect()
        return rounds

    rounds = async_to_sync(scenario)()
    assert [[e["line"]["index"] for e in events] for events in rounds[:3]] == [[3, 4, 5], [0, 1], [2]]
    lines = [e["line"] for events in rounds[:3] for e in events]
    assert sorted(lines, key=lambda line: line["index"]) == batch_results(job=job, after=-1, limit=10)
    assert all(e["type"] == "batch.result" and e["job_id"] == str(job.id) and e["id"] == "f1" for events in rounds[:3] for e in events)
    (done,) = rounds[3]
    assert (done["type"], done["id"], done["status"], done["counts"]["done"]) == ("batch.done", "f1", "completed", 6)


@pytest.mark.django_db(transaction=True)
def test_following_a_cancelled_job_ends_with_what_ran(owner: TenantFixture, queued: list[Any], quick: None) -> None:
    job = job_of(owner, 4)
    batch_run_chunk(job_id=str(job.id), first=0, last=1)

    async def scenario() -> list[dict[str, Any]]:
        ws = await ws_connect(owner.key)
        await ws.send_to(text_data=json.dumps({"type": "batch_follow", "job_id": str(job.id), "after": 0}))
        events = [json.loads(await ws.receive_from(timeout=10))]
        await in_a_thread(batch_cancel, tenant_id=str(owner.tenant.id), job_id=job.id)
        events.append(json.loads(await ws.receive_from(timeout=10)))
        await ws.disconnect()
        return events

    line, done = async_to_sync(scenario)()
    assert line["line"]["index"] == 1  # after index 0
    assert (done["type"], done["status"], done["counts"]["cancelled"]) == ("batch.done", "cancelled", 2)


@pytest.mark.django_db(transaction=True)
def test_batch_follow_refuses_what_it_cannot_follow(owner: TenantFixture, queued: list[Any]) -> None:
    theirs = job_of(make_tenant("other"), 1)

    async def scenario() -> list[dict[str, Any]]:
        ws = await ws_connect(owner.key)
        answers = []
        for message in (
            {"type": "batch_follow", "id": 1, "job_id": str(theirs.id)},
            {"type": "batch_follow", "id": 2, "job_id": "not-a-uuid"},
            {"type": "batch_follow", "id": 3, "job_id": str(theirs.id), "after": "0"},
            {"type": "batch_follow", "id": 4, "job_id": str(theirs.id), "after": -2},
            {"type": "follow", "id": 5},
        ):
            await ws.send_to(text_data=json.dumps(message))
            answers.append(json.loads(await ws.receive_from(timeout=10)))
        await ws.disconnect()
        return answers

    answers = async_to_sync(scenario)()
    assert [(a["type"], a["id"], a["code"]) for a in answers] == [
        ("error", 1, "not_found"),  # another tenant's job
        ("error", 2, "not_found"),
        ("error", 3, "invalid_request"),
        ("error", 4, "invalid_request"),
        ("error", 5, "invalid_request"),
    ]
    assert answers[4]["message"] == "type must be one of auth, prompt, resume, batch_follow"


async def http_get(path: str, key: str) -> ApplicationCommunicator:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path.split("?")[0],
        "raw_path": path.split("?")[0].encode(),
        "query_string": path.partition("?")[2].encode(),
        "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {key}".encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    http = ApplicationCommunicator(application, scope)
    await http.send_input({"type": "http.request", "body": b"", "more_body": False})
    return http


@pytest.mark.django_db(transaction=True)
def test_results_follow_keeps_the_response_open_and_sends_each_line_as_it_finishes(owner: TenantFixture, queued: list[Any], quick: None) -> None:
    job = job_of(owner, 5)
    batch_run_chunk(job_id=str(job.id), first=1, last=1)

    async def scenario() -> tuple[dict[str, Any], list[bytes]]:
        http = await http_get(f"/api/v1/batch/{job.id}/results?follow=true", owner.key)
        start = await http.receive_output(timeout=10)
        bodies = []
        for first, last in ((4, 4), (0, 3)):
            body = await http.receive_output(timeout=10)  # what had finished, or what just did
            bodies.append(body["body"])
            assert body["more_body"]
            await run(job, first, last)
        while (message := await http.receive_output(timeout=10)).get("more_body"):
            bodies.append(message["body"])
        assert message == {"type": "http.response.body"}  # the end of the response
        await http.wait(timeout=10)  # the response ended with the job
        return start, bodies

    start, bodies = async_to_sync(scenario)()
    headers = {name.lower(): value for name, value in start["headers"]}
    assert start["status"] == 200 and headers[b"content-type"] == b"application/x-ndjson" and headers[b"x-accel-buffering"] == b"no"
    sent = [[json.loads(line)["index"] for line in body.splitlines()] for body in bodies if body]
    assert sent == [[1], [4], [0, 2, 3]]  # each as it finished, the late ones included


@pytest.mark.django_db
def test_follow_must_be_a_boolean(owner: TenantFixture, queued: list[Any]) -> None:
    job = job_of(owner, 2)
    refused = owner.client.get(f"/api/v1/batch/{job.id}/results", {"follow": "sometimes"})
    assert refused.status_code == 400 and refused.json()["error"]["data"]["field"] == "follow"
    batch_run_chunk(job_id=str(job.id), first=1, last=1)
    BatchJob.objects.filter(pk=job.pk).update(status="cancelled")
    ended = owner.client.get(f"/api/v1/batch/{job.id}/results", {"follow": "1"})  # an ended job: what it has, at once
    assert [line["index"] for line in ndjson(ended)] == [1]


@pytest.mark.django_db
def test_a_stream_destination_is_delivered_once_the_job_completes(owner: TenantFixture, queued: list[Any], deliveries_queued: list[str]) -> None:
    job = batch_create(tenant=owner.tenant, data={"prompts": [Prompt("a", ""), Prompt("b", "")], "destinations": [{"kind": "stream"}]}, config=get_config())
    assert [(d["kind"], d["state"]) for d in destinations.states(job)] == [("stream", "pending")]
    batch_run_chunk(job_id=str(job.id), first=0, last=1)
    services.batch_deliver(job_id=str(job.id))
    assert [(d["kind"], d["state"], d["lines"]) for d in destinations.states(job)] == [("stream", "delivered", 2)]
    with pytest.raises(InvalidRequest) as refused:
        destinations.validated([{"kind": "stream", "url": "x"}], get_config())
    assert refused.value.data["field"] == "destinations[0].url"
