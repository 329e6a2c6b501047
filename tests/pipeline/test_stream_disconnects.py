"""Clients that leave mid-stream, through a real Daphne gateway and a real Celery
worker, against the fake OpenAI upstream: the upstream call stops within a
second of the last reader leaving, and a thousand such departures leave nothing
behind (upstream connections, running tasks, gateway tasks, Redis keys)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import websockets
from asgiref.sync import async_to_sync

from orchestrator_site.celery import app
from pipeline.services.gates import admission
from pipeline.tokenbus import get_bus
from tests.conftest import Fakes, TenantFixture, WorkerProcess, start_gateway, stop_process

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SLOW_REPLY = [f"w{i} " for i in range(60)]  # 3 s at 50 ms a token: far longer than any test waits


@pytest.fixture(scope="module")
def gateway(realtime_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_gateway(tmp_path_factory.mktemp("disconnects") / "gateway.log")
    yield url
    stop_process(proc)


@pytest.fixture
def slow_upstream(fakes: Fakes) -> Fakes:
    fakes.openai.tokens, fakes.openai.token_delay_s = SLOW_REPLY, 0.05
    return fakes


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/api/v1/stream"


async def ws_leave_after(url: str, key: str, tokens: int, *, abort: bool = False, worker: str = "openai") -> str:
    """A WebSocket client that reads ``tokens`` tokens and goes: a clean close, or
    its socket dropped (``abort``). Returns the request id."""
    async with websockets.connect(ws_url(url), additional_headers={"Authorization": f"Bearer {key}"}, open_timeout=10) as ws:
        assert json.loads(await ws.recv())["type"] == "authenticated"
        await ws.send(json.dumps({"type": "prompt", "prompt": "talk to me", "worker": worker}))
        start = json.loads(await ws.recv())
        assert start["type"] == "start", start
        for _ in range(tokens):
            event = json.loads(await asyncio.wait_for(ws.recv(), 15))
            assert event["type"] == "token", event
        if abort:
            ws.transport.abort()  # no closing handshake: a dropped network
    return str(start["request_id"])


async def sse_leave_after(client: httpx.AsyncClient, url: str, key: str, tokens: int) -> str:
    body = {"prompt": "talk to me", "worker": "openai", "stream": True}
    async with client.stream("POST", f"{url}/api/v1/infer", json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status_code == 200
        rid, seen = "", 0
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                rid = rid or event["request_id"]
                seen += event["type"] == "token"
                if seen >= tokens:
                    break
    return rid  # leaving the block closes the connection with the body half read


def openai_leave_after(url: str, key: str, tokens: int) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    stream = client.chat.completions.create(model="openai/gpt-fake", messages=[{"role": "user", "content": "talk to me"}], stream=True)
    rid, seen = "", 0
    for chunk in stream:
        rid = chunk.id.removeprefix("chatcmpl-")
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen >= tokens:
            break
    stream.close()
    return rid


def wait_for(check: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())


def infer_caller_leaves(url: str, key: str) -> str:
    """A ``POST /api/v1/infer`` caller (no streaming) that gives up while the answer is
    being written: its client times out and closes the connection."""
    session = f"leaver-{time.monotonic_ns()}"
    body = {"prompt": "talk to me", "worker": "openai", "session_id": session}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/api/v1/infer", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=httpx.Timeout(10, read=0.6))
    bus = get_bus()
    for record_key in bus.redis.client.scan_iter(f"{bus.prefix}:req:*", count=1000):
        if bus.redis.client.hget(record_key, "session_id") == session:
            return str(record_key).rsplit(":", 1)[-1]
    raise AssertionError("the caller's request was never recorded")


def leave(how: str, url: str, key: str) -> str:
    if how == "infer-caller":
        return infer_caller_leaves(url, key)
    if how == "websocket":
        return async_to_sync(ws_leave_after)(url, key, 2)
    if how == "websocket-dropped":
        return async_to_sync(ws_leave_after)(url, key, 2, abort=True)
    if how == "sse":

        async def sse() -> str:
            async with httpx.AsyncClient(timeout=15) as client:
                return await sse_leave_after(client, url, key, 2)

        return async_to_sync(sse)()
    return openai_leave_after(url, key, 2)


@pytest.mark.parametrize("how", ["websocket", "websocket-dropped", "sse", "openai-sdk", "infer-caller"])
def test_the_upstream_call_stops_within_a_second_of_the_client_leaving(gateway: str, owner: TenantFixture, slow_upstream: Fakes, how: str) -> None:
    """The provider's answer takes 3 s (60 tokens, 50 ms apart) and the request's deadline
    is 15 s: only the readers' leaving can stop it within the second."""
    fake = slow_upstream.openai
    calls_before, sent_before = len(fake.requests), fake.events_sent
    rid = leave(how, gateway, owner.key)
    left = time.monotonic()
    sent_when_left = fake.events_sent
    assert wait_for(lambda: fake.client_aborts, 5.0), "the upstream stream was never closed"
    assert fake.client_aborts[0] - left < 1.0, f"upstream closed {fake.client_aborts[0] - left:.2f}s after the client left"
    assert fake.events_sent - sent_when_left <= 1.0 / fake.token_delay_s  # at most a second's worth of tokens more
    assert fake.events_sent - sent_before < len(SLOW_REPLY)  # the answer was never written whole
    bus = get_bus()
    assert wait_for(lambda: bus.get_record(rid).get("status") == "failed", 5.0)
    last = bus.read_all(rid)[-1]
    assert (last.type, last.data["code"]) == ("error", "request_cancelled")
    assert len(fake.requests) == calls_before + 1  # one upstream call, never retried
    assert wait_for(lambda: fake.active_streams == 0, 2.0)


def test_a_request_nobody_reads_is_never_stopped_this_way(gateway: str, owner: TenantFixture, slow_upstream: Fakes) -> None:
    """``"wait": false``: the client polls later, nobody reads the stream, and the
    request runs to its end."""
    fake = slow_upstream.openai
    fake.token_delay_s = 0.01
    sent_before, aborts_before = fake.events_sent, len(fake.client_aborts)
    resp = httpx.post(f"{gateway}/api/v1/infer", json={"prompt": "later", "worker": "openai", "wait": False}, headers={"Authorization": f"Bearer {owner.key}"})
    rid = resp.json()["request_id"]
    assert wait_for(lambda: get_bus().get_record(rid).get("status") == "completed", 10.0), get_bus().get_record(rid)
    assert len(fake.client_aborts) == aborts_before and fake.events_sent - sent_before >= len(SLOW_REPLY)  # written whole


def test_a_client_that_resumes_a_cancelled_request_is_told_so(gateway: str, owner: TenantFixture, slow_upstream: Fakes) -> None:
    rid = leave("websocket", gateway, owner.key)
    assert wait_for(lambda: get_bus().get_record(rid).get("status") == "failed", 5.0)

    async def resume() -> list[dict[str, Any]]:
        async with websockets.connect(ws_url(gateway), additional_headers={"Authorization": f"Bearer {owner.key}"}) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "resume", "request_id": rid, "after_seq": -1}))
            events = []
            while not events or events[-1]["type"] not in ("done", "error"):
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            return events

    events = async_to_sync(resume)()
    tokens = [e for e in events if e["type"] == "token"]
    assert len(tokens) >= 2 and [t["seq"] for t in tokens] == list(range(len(tokens)))
    assert events[-1]["code"] == "request_cancelled" and events[-1]["data"]["after_tokens"] >= 2


def gateway_tasks(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(r"^orchestrator_gateway_asyncio_tasks (\S+)$", text, re.MULTILINE)
    assert match, "no orchestrator_gateway_asyncio_tasks in the exposition"
    return int(float(match.group(1)))


def settled(fake: Any) -> bool:
    return fake.active_streams == 0 and admission().in_flight() == 0


def thousand_departures(url: str, key: str, n: int, concurrency: int) -> list[str]:
    async def run() -> list[str]:
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=concurrency)) as client:

            async def one(i: int) -> str:
                async with gate:
                    if i % 3 == 0:
                        return await sse_leave_after(client, url, key, 1)
                    return await ws_leave_after(url, key, 1, abort=i % 3 == 2)

            return list(await asyncio.gather(*(one(i) for i in range(n))))

    return async_to_sync(run)()


def test_a_thousand_mid_stream_disconnects_leave_nothing_behind(
    gateway: str, owner: TenantFixture, slow_upstream: Fakes, realtime_worker: WorkerProcess
) -> None:
    fake = slow_upstream.openai
    fake.token_delay_s = 0.02
    thousand_departures(gateway, owner.key, 30, 10)  # warm: connections, pools, first-use imports
    assert wait_for(lambda: settled(fake), 15.0)
    tasks_before, connections_before, written_before = gateway_tasks(gateway), fake.open_connections, fake.streams_written

    rids = thousand_departures(gateway, owner.key, 1000, 25)
    assert len(set(rids)) == 1000

    assert wait_for(lambda: settled(fake), 20.0), f"still streaming upstream: {fake.active_streams}, in flight: {admission().in_flight()}"
    # Upstream: no stream left open; idle keep-alive connections at most one per worker thread.
    assert fake.active_streams == 0 and fake.open_connections <= max(connections_before, 8)
    bus = get_bus()
    completed = [(i % 3, bus.get_record(rid)) for i, rid in enumerate(rids) if bus.get_record(rid).get("status") != "failed"]
    assert not completed, completed
    assert len(fake.client_aborts) >= 1000 and fake.streams_written == written_before, (
        len(fake.client_aborts),
        fake.streams_written - written_before,
    )  # every request's upstream call was cut, none ran to its end
    # The worker runs nothing.
    active = app.control.inspect(destination=[f"realtime-test-{os.getpid()}@localhost"], timeout=5).active() or {}
    assert all(not running for running in active.values()), active
    # The gateway's event loop is back where it was.
    assert wait_for(lambda: gateway_tasks(gateway) <= tasks_before + 2, 10.0), (tasks_before, gateway_tasks(gateway))
    # Redis: every key of these requests expires (stream, status and reader set: three each).
    bus = get_bus()
    pipe = bus.redis.client.pipeline(transaction=False)
    for rid in rids:
        for key in (bus.stream_key(rid), bus.record_key(rid), bus.readers_key(rid)):
            pipe.ttl(key)
    ttls = pipe.execute()
    assert all(0 < ttl <= bus.ttl_s for ttl in ttls), sorted(set(ttls))[:5]
    statuses = {bus.get_record(rid).get("status") for rid in rids}
    assert statuses == {"failed"}, statuses  # each one cancelled, none left running or queued
