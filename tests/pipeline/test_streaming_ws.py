"""The WebSocket API against a real Celery worker: authentication both ways,
prompts, several at once on one connection, resume, and bad messages that never
close the connection."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator

from orchestrator_site.asgi import application
from tests.conftest import Fakes, TenantFixture, WorkerProcess

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

STREAM = "/api/v1/stream"


@pytest.fixture(autouse=True)
def _worker(realtime_worker: WorkerProcess, fakes: Fakes) -> None:
    """Every test here runs against the real worker process and the fakes."""


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return async_to_sync(scenario)()


async def connect(key: str | None = None) -> WebsocketCommunicator:
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    ws = WebsocketCommunicator(application, STREAM, headers=headers)
    connected, _ = await ws.connect(timeout=10)
    assert connected
    if key:
        assert (await receive(ws))["type"] == "authenticated"
    return ws


async def receive(ws: WebsocketCommunicator, timeout: float = 15) -> dict[str, Any]:
    return json.loads(await ws.receive_from(timeout=timeout))


async def until_end(ws: WebsocketCommunicator, request_ids: set[str] | None = None) -> list[dict[str, Any]]:
    """Events until every request (or the first one) has its done or error."""
    events: list[dict[str, Any]] = []
    open_ids = set(request_ids or ())
    while True:
        event = await receive(ws)
        events.append(event)
        if event["type"] in ("done", "error"):
            open_ids.discard(event["request_id"])
            if not open_ids:
                return events


def one_prompt(key: str, **fields: object) -> list[dict[str, Any]]:
    """Every event of one prompt on a fresh connection, its start first."""

    async def scenario() -> list[dict[str, Any]]:
        ws = await connect(key)
        await ws.send_to(text_data=json.dumps({"type": "prompt", **fields}))
        start = await receive(ws)
        events = [start, *await until_end(ws, {start["request_id"]})]
        await ws.disconnect()
        return events

    return run(scenario)


def test_header_auth_then_a_prompt_streams_start_tokens_done(owner: TenantFixture) -> None:
    events = one_prompt(owner.key, prompt="stream me please", worker="openai")
    assert events[0]["type"] == "start" and events[-1]["type"] == "done"
    rid = events[0]["request_id"]
    tokens = [e for e in events if e["type"] == "token"]
    assert [t["seq"] for t in tokens] == list(range(len(tokens))) and "".join(t["text"] for t in tokens) == "Hello, world!"
    assert all(e["request_id"] == rid for e in events)
    done = events[-1]
    assert done["usage"]["completion_tokens"] == 4 and list(done["timings_us"]) == ["rag", "assemble", "inference", "post", "stream"]
    usage = done["usage"]  # the openai worker's test prices: 1000 and 2000 USD per million tokens
    assert done["cost"] == pytest.approx((usage["prompt_tokens"] * 1000 + usage["completion_tokens"] * 2000) / 1e6) and done["cost"] > 0


def test_browsers_authenticate_with_a_first_message(owner: TenantFixture) -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        ws = await connect()
        await ws.send_to(text_data=json.dumps({"type": "auth", "api_key": owner.key}))
        authed = await receive(ws)
        await ws.send_to(text_data=json.dumps({"type": "prompt", "prompt": "via message"}))
        events = await until_end(ws, {(await receive(ws))["request_id"]})
        await ws.disconnect()
        return authed, events[-1]

    authed, last = run(scenario)
    assert authed == {"type": "authenticated", "tenant_id": str(owner.tenant.id)}
    assert last["type"] == "done" and last["worker"] == "echo"


@pytest.mark.parametrize("how", ["header", "message", "none"])
def test_a_bad_or_missing_key_is_refused_with_4401(how: str) -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        headers = [(b"authorization", b"Bearer po_00000000_not-a-real-key")] if how == "header" else []
        ws = WebsocketCommunicator(application, STREAM, headers=headers)
        await ws.connect(timeout=10)
        if how == "message":
            await ws.send_to(text_data=json.dumps({"type": "auth", "api_key": "po_00000000_not-a-real-key"}))
        elif how == "none":
            await ws.send_to(text_data=json.dumps({"type": "prompt", "prompt": "who am I"}))
        error = await receive(ws)
        closed = await ws.receive_output(timeout=5)
        return error, closed

    error, closed = run(scenario)
    assert error["type"] == "error" and error["code"] == ("api_key_missing" if how == "none" else "api_key_invalid")
    assert closed == {"type": "websocket.close", "code": 4401}


def test_bad_messages_get_errors_and_the_connection_lives_on(owner: TenantFixture) -> None:
    async def scenario() -> list[dict[str, Any]]:
        ws = await connect(owner.key)
        answers = []
        for raw in [
            "not json",
            "[1, 2]",
            json.dumps({"type": "dance"}),
            json.dumps({"type": "prompt", "prompt": "  "}),
            json.dumps({"type": "prompt", "prompt": "x", "max_tokens": -3}),
            json.dumps({"type": "resume"}),
            json.dumps({"type": "resume", "request_id": "r", "after_seq": "x"}),
            json.dumps({"type": "auth"}),
            json.dumps({"type": "prompt", "prompt": "x", "worker": "nope"}),
        ]:
            await ws.send_to(text_data=raw)
            answers.append(await receive(ws))
        await ws.send_to(text_data=json.dumps({"type": "prompt", "prompt": "still alive"}))
        start = await receive(ws)
        answers.append((await until_end(ws, {start["request_id"]}))[-1])
        await ws.disconnect()
        return answers

    answers = run(scenario)
    codes = [a.get("code") for a in answers[:-1]]
    assert codes == [
        "invalid_request",
        "invalid_request",
        "invalid_request",
        "prompt_missing",
        "invalid_request",
        "invalid_request",
        "invalid_request",
        "invalid_request",
        "unknown_worker",
    ]
    assert all(a["type"] == "error" and a["request_id"] is None for a in answers[:-1])
    assert answers[-1]["type"] == "done"


def test_several_prompts_at_once_on_one_connection(owner: TenantFixture, fakes: Fakes) -> None:
    fakes.openai.token_delay_s = 0.05  # slow enough that the streams overlap

    async def scenario() -> list[dict[str, Any]]:
        ws = await connect(owner.key)
        for i in range(3):
            await ws.send_to(text_data=json.dumps({"type": "prompt", "prompt": f"parallel {i}", "worker": "openai" if i else "echo"}))
        events: list[dict[str, Any]] = []
        while sum(e["type"] in ("done", "error") for e in events) < 3:  # interleaved: a start may follow another's tokens
            events.append(await receive(ws))
        await ws.disconnect()
        return events

    events = run(scenario)
    ids = {e["request_id"] for e in events if e["type"] == "start"}
    assert len(ids) == 3
    assert {e["request_id"] for e in events if e["type"] == "done"} == ids  # each ended once
    for rid in ids:
        seqs = [e["seq"] for e in events if e["type"] == "token" and e["request_id"] == rid]
        assert seqs == list(range(len(seqs))) and seqs


def test_resume_replays_after_a_sequence_number(owner: TenantFixture, outsider: TenantFixture) -> None:
    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        ws = await connect(owner.key)
        await ws.send_to(text_data=json.dumps({"type": "prompt", "prompt": "remember this", "worker": "openai"}))
        rid = (await receive(ws))["request_id"]
        first = await until_end(ws, {rid})
        await ws.disconnect()
        again = await connect(owner.key)  # a reconnecting client
        await again.send_to(text_data=json.dumps({"type": "resume", "request_id": rid}))
        everything = await until_end(again, {rid})
        await again.send_to(text_data=json.dumps({"type": "resume", "request_id": rid, "after_seq": 1}))
        rest = await until_end(again, {rid})
        await again.disconnect()
        other = await connect(outsider.key)
        await other.send_to(text_data=json.dumps({"type": "resume", "request_id": rid}))
        refused = await receive(other)
        await other.disconnect()
        return first, everything, rest, refused

    first, everything, rest, refused = run(scenario)
    tokens = [e for e in first if e["type"] == "token"]
    assert [e for e in everything if e["type"] == "token"] == tokens
    assert [e["seq"] for e in rest if e["type"] == "token"] == [t["seq"] for t in tokens if t["seq"] > 1]
    assert everything[-1]["type"] == rest[-1]["type"] == "done"
    assert refused["type"] == "error" and refused["code"] == "not_found"  # another tenant's request


def test_a_worker_failure_ends_the_stream_with_an_error_not_done(owner: TenantFixture, fakes: Fakes) -> None:
    fakes.openai.mode = "401"  # the worker fails (mid-stream drops: once the worker streams from the provider)

    events = one_prompt(owner.key, prompt="cut", worker="openai")
    assert events[-1]["type"] == "error" and events[-1]["code"].startswith("worker_")
    assert not any(e["type"] == "done" for e in events)


@pytest.mark.parametrize(("worker", "fake"), [("openai", "openai"), ("anthropic", "anthropic"), ("llamacpp", "llamacpp"), ("vllm", "vllm")])
@pytest.mark.parametrize("mode", ["drop", "cut"])
def test_a_provider_lost_mid_stream_ends_it_with_an_error_after_its_tokens(owner: TenantFixture, fakes: Fakes, worker: str, fake: str, mode: str) -> None:
    getattr(fakes, fake).mode = mode  # drop: the socket closes mid-body; cut: the body ends without the final event

    events = one_prompt(owner.key, prompt="cut me off", worker=worker)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "worker_connection_error", events[-1]
    assert [e["type"] for e in events].count("error") == 1 and not any(e["type"] == "done" for e in events)
    assert any(e["type"] == "token" for e in events)  # the tokens before the loss reached the client
