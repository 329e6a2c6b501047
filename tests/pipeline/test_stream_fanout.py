"""Streaming deduplication through WebSocket clients: identical concurrent prompts
share one upstream stream; every client gets the identical token sequence at its
own reading speed, a slow one never delays a fast one, and one leaving does not
stop the others. The consumer runs in this process (deduplication on), the
request in a real Celery worker, against the fake OpenAI upstream."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator

from orchestrator_site.asgi import application
from pipeline.tokenbus import get_bus
from tests.conftest import Fakes, TenantFixture, WorkerProcess

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

REPLY = [f"t{i} " for i in range(20)]
GAP_S = 0.05  # the upstream's pace: a token every 50 ms, about 1 s in all


@pytest.fixture(autouse=True)
def _setting(realtime_worker: WorkerProcess, fakes: Fakes, dedup_on: object) -> None:
    fakes.openai.tokens, fakes.openai.token_delay_s = REPLY, GAP_S


async def client(key: str, *, pause_s: float = 0.0, leave_after: int | None = None) -> list[tuple[float, dict[str, Any]]]:
    """One WebSocket client sending the shared prompt; each event with the time it
    was taken in. ``pause_s`` between reads makes it slow; ``leave_after`` tokens, it goes."""
    ws = WebsocketCommunicator(application, "/api/v1/stream", headers=[(b"authorization", f"Bearer {key}".encode())])
    connected, _ = await ws.connect(timeout=10)
    assert connected and json.loads(await ws.receive_from(timeout=10))["type"] == "authenticated"
    await ws.send_to(text_data=json.dumps({"type": "prompt", "prompt": "the same question", "worker": "openai"}))
    events: list[tuple[float, dict[str, Any]]] = []
    while not events or events[-1][1]["type"] not in ("done", "error"):
        events.append((time.monotonic(), json.loads(await ws.receive_from(timeout=15))))
        if pause_s:
            await asyncio.sleep(pause_s)
        if leave_after is not None and sum(e["type"] == "token" for _, e in events) >= leave_after:
            break
    await ws.disconnect()
    return events


def tokens(events: list[tuple[float, dict[str, Any]]]) -> list[tuple[int, str]]:
    return [(e["seq"], e["text"]) for _, e in events if e["type"] == "token"]


def test_identical_prompts_share_one_upstream_stream_at_every_reading_speed(owner: TenantFixture, fakes: Fakes) -> None:
    calls_before = len(fakes.openai.requests)

    async def scenario() -> list[list[tuple[float, dict[str, Any]]]]:
        first = asyncio.ensure_future(client(owner.key))
        await asyncio.sleep(0.2)  # in flight: the others attach to it
        others = [client(owner.key), client(owner.key, pause_s=0.15), client(owner.key, pause_s=0.01)]
        return [await first, *await asyncio.gather(*others)]

    fast, also_fast, slow, medium = async_to_sync(scenario)()
    assert len(fakes.openai.requests) == calls_before + 1  # one upstream call for four clients
    expected = tokens(fast)
    assert "".join(text for _, text in expected) == "".join(REPLY).strip() and [seq for seq, _ in expected] == list(range(len(expected)))
    for other in (also_fast, slow, medium):
        assert tokens(other) == expected  # the identical sequence, nothing lost
        assert other[-1][1]["type"] == "done" and other[0][1]["request_id"] != fast[0][1]["request_id"]
    # The slow client takes over 3 s to read what the fast ones had in about 1 s.
    fast_end, slow_end = fast[-1][0], slow[-1][0]
    assert slow_end - fast_end > 1.0
    assert fast_end - fast[0][0] < len(REPLY) * GAP_S + 1.0


def test_one_client_leaving_does_not_stop_the_stream_for_the_others(owner: TenantFixture, fakes: Fakes) -> None:
    calls_before = len(fakes.openai.requests)

    async def scenario() -> tuple[list[tuple[float, dict[str, Any]]], list[tuple[float, dict[str, Any]]]]:
        stayer = asyncio.ensure_future(client(owner.key))
        await asyncio.sleep(0.2)
        leaver = await client(owner.key, leave_after=2)
        return leaver, await stayer

    leaver, stayer = async_to_sync(scenario)()
    assert stayer[-1][1]["type"] == "done" and "".join(text for _, text in tokens(stayer)) == "".join(REPLY).strip()
    assert leaver[-1][1]["type"] == "token"  # it went mid-stream
    assert fakes.openai.client_aborts == [] and len(fakes.openai.requests) == calls_before + 1


def test_when_the_last_of_several_clients_leaves_the_upstream_stops(owner: TenantFixture, fakes: Fakes) -> None:
    fakes.openai.tokens = REPLY * 5  # 5 s of reply

    async def scenario() -> tuple[list[tuple[float, dict[str, Any]]], ...]:
        first = asyncio.ensure_future(client(owner.key, leave_after=3))
        await asyncio.sleep(0.2)
        return (await first, *await asyncio.gather(client(owner.key, leave_after=4), client(owner.key, leave_after=6)))

    clients = async_to_sync(scenario)()
    left = time.monotonic()
    deadline = left + 5
    while not fakes.openai.client_aborts and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fakes.openai.client_aborts and fakes.openai.client_aborts[0] - left < 1.0
    rid = clients[0][0][1]["request_id"]
    deadline = time.monotonic() + 5
    while get_bus().get_record(rid).get("status") != "failed" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert get_bus().read_all(rid)[-1].data["code"] == "request_cancelled"
