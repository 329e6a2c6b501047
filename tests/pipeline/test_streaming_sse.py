"""Server-Sent Events: ``POST /api/v1/infer`` with ``"stream": true`` through a real
Daphne gateway and a real Celery worker, read with a real HTTP client; and the
event generator's own paths in process (answers from the window, Redis down,
resume positions, timeouts)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from asgiref.sync import async_to_sync

from orchestrator_site.errors import ApiKeyMissing
from pipeline import streaming
from pipeline.config import PipelineSettings
from pipeline.services import start
from pipeline.shared_redis import SharedRedis
from pipeline.tokenbus import TokenBus, get_bus, reader, set_bus
from pipeline.types import PipelineResult, Usage
from tests.conftest import Fakes, TenantFixture, WorkerProcess, free_port, start_gateway, stop_process


def parse_sse(body: str) -> list[dict[str, Any]]:
    """Events as a client parses them: blocks split by a blank line, ``event:``,
    ``id:`` and ``data:`` fields."""
    events = []
    for block in body.strip().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            name, _, value = line.partition(": ")
            fields[name] = value
        event = json.loads(fields["data"])
        assert event["type"] == fields["event"]
        if "id" in fields:
            assert int(fields["id"]) == event["seq"]
        events.append(event)
    return events


@pytest.fixture(scope="module")
def gateway(realtime_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_gateway(tmp_path_factory.mktemp("sse") / "gateway.log")
    yield url
    stop_process(proc)


def stream(url: str, key: str, **body: object) -> tuple[httpx.Response, list[dict[str, Any]]]:
    with httpx.stream("POST", f"{url}/api/v1/infer", json={**body, "stream": True}, headers={"Authorization": f"Bearer {key}"}, timeout=30) as resp:
        text = "".join(resp.iter_text())
    if resp.headers["content-type"].startswith("text/event-stream"):
        return resp, parse_sse(text)
    return resp, [json.loads(text)]


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_an_answer_streams_as_server_sent_events(gateway: str, owner: TenantFixture, fakes: Fakes) -> None:
    resp, events = stream(gateway, owner.key, prompt="sse please", worker="openai")
    assert resp.status_code == 200 and resp.headers["cache-control"] == "no-cache"
    assert events[0]["type"] == "start" and events[-1]["type"] == "done"
    tokens = [e for e in events if e["type"] == "token"]
    assert "".join(t["text"] for t in tokens) == "Hello, world!" and [t["seq"] for t in tokens] == list(range(len(tokens)))
    assert events[-1]["usage"]["completion_tokens"] == 4 and {e["request_id"] for e in events} == {events[0]["request_id"]}


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_failure_mid_stream_ends_with_an_error_event(gateway: str, owner: TenantFixture, fakes: Fakes) -> None:
    fakes.openai.mode = "401"  # the worker fails (mid-stream drops: once the worker streams from the provider)
    _, events = stream(gateway, owner.key, prompt="cut", worker="openai")
    assert events[0]["type"] == "start" and events[-1]["type"] == "error" and events[-1]["code"].startswith("worker_")
    assert not any(e["type"] == "done" for e in events)


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_refusals_before_the_start_are_plain_json_errors(gateway: str, owner: TenantFixture) -> None:
    resp, body = stream(gateway, owner.key, prompt="")
    assert resp.status_code == 400 and body[0]["error"]["code"] == "prompt_missing"
    resp, body = stream(gateway, "po_00000000_nope-nope-nope", prompt="x")
    assert resp.status_code == 401


# --- the generator, in process --------------------------------------------------------


def collect(events: Any) -> list[dict[str, Any]]:
    async def drain() -> list[dict[str, Any]]:
        return [e async for e in events]

    return async_to_sync(drain)()


def request_for(owner: TenantFixture, prompt: str = "p") -> Any:
    return start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": prompt}, config=PipelineSettings())


@pytest.mark.django_db
def test_an_answer_from_the_window_is_one_token_and_done(owner: TenantFixture) -> None:
    request = request_for(owner)
    result = PipelineResult(
        request_id="earlier", session_id="s", text="cached text", worker="echo", model="echo-1", finish_reason="stop", usage=Usage(1, 2), timings_us={}
    )
    events = collect(streaming.prompt_events(request, start.Started(start.StartKind.CACHED, "earlier", result), timeout_s=1))
    assert [e["type"] for e in events] == ["start", "token", "done"]
    assert events[1] == {"type": "token", "request_id": request.request_id, "seq": 0, "text": "cached text"}


@pytest.mark.django_db(transaction=True)
def test_with_redis_down_the_answer_is_run_here_and_streamed_whole(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    request = request_for(owner, "inline stream")
    events = collect(streaming.prompt_events(request, start.Started(start.StartKind.LOCAL, request.request_id), timeout_s=1))
    assert [e["type"] for e in events] == ["start", "token", "done"] and events[1]["text"].startswith("inline stream")


def test_a_stream_lost_to_redis_is_an_error_never_a_second_run(monkeypatch: pytest.MonkeyPatch) -> None:
    dead = SharedRedis(url=f"redis://127.0.0.1:{free_port()}/0", prefix="x", socket_timeout_s=0.5)
    monkeypatch.setattr(reader, "OUTAGE_S", 0.3)
    set_bus(TokenBus(redis=dead, maxlen=10, ttl_s=10))
    try:
        lost = collect(streaming.stream_events("gone", client_request_id="gone", timeout_s=5))
    finally:
        set_bus(None)
    assert [e["type"] for e in lost] == ["error"] and lost[0]["code"] == "service_unavailable" and lost[0]["data"]["retry_after"] == 1.0


def test_positions_timeouts_and_errors_from_the_bus() -> None:
    bus = get_bus()
    rid = "sse-unit-" + str(free_port())
    for seq, text in enumerate(["a", "b", "c"]):
        bus.append(rid, "token", {"seq": seq, "text": text})
    after = collect(streaming.stream_events(rid, client_request_id="mine", timeout_s=0.3, after_seq=0))
    assert [(e["type"], e.get("seq")) for e in after] == [("token", 1), ("token", 2), ("error", None)]
    assert after[-1]["code"] == "request_timeout" and all(e["request_id"] == "mine" for e in after)
    bus.append(rid, "error", ApiKeyMissing().to_dict())
    ended = collect(streaming.stream_events(rid, client_request_id="mine", timeout_s=1, after_seq=2))
    assert ended == [{"type": "error", "request_id": "mine", **ApiKeyMissing().to_dict()}]


def test_sse_frames() -> None:
    assert streaming.sse_frame({"type": "token", "request_id": "r", "seq": 3, "text": "hi"}) == (
        b'id: 3\nevent: token\ndata: {"type":"token","request_id":"r","seq":3,"text":"hi"}\n\n'
    )
    assert streaming.sse_frame({"type": "start", "request_id": "r"}).startswith(b"event: start\n")


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_tokens_arrive_while_the_model_is_still_writing(gateway: str, owner: TenantFixture, fakes: Fakes) -> None:
    """Nothing buffers the reply: with the provider pausing 0.4 s between its four
    tokens, the client has the first one long before the last."""
    import time

    fakes.openai.token_delay_s = 0.4
    arrivals: list[tuple[float, str]] = []
    body = {"prompt": "slowly", "worker": "openai", "stream": True}
    with httpx.stream("POST", f"{gateway}/api/v1/infer", json=body, headers={"Authorization": f"Bearer {owner.key}"}, timeout=30) as resp:
        for line in resp.iter_lines():
            if line.startswith("event: "):
                arrivals.append((time.monotonic(), line.removeprefix("event: ")))
    kinds = [kind for _, kind in arrivals]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("token") >= 2
    first_token = next(t for t, kind in arrivals if kind == "token")
    assert arrivals[-1][0] - first_token >= 0.8  # at least two of the provider's pauses came after it
