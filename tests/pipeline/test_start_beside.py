"""A real-time task's start overlaps its two first round trips: the start script is
sent to Redis, the RAG search runs on Postgres while Redis answers, then the script's
reply is read (``tokenbus.script_beside``, ``services.ReadAhead``); a request of a
named session has its stored turns read in the search's round trip. Against the
real Redis and Postgres: the order, the fallbacks (a server without the script, a
dead pooled connection), a ``beside`` that fails, and what was read handed to its
stage once."""

from __future__ import annotations

import dataclasses
import inspect
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.db import DatabaseError, connection
from django.test.utils import CaptureQueriesContext

from pipeline import selectors, services
from pipeline.config import PipelineSettings, RagConfig
from pipeline.stages.rag import RetrievalResult, search_args
from pipeline.tokenbus import get_bus, script_beside
from pipeline.types import PromptRequest
from tests.conftest import TenantFixture

SET_AND_RETURN = "redis.call('SET', KEYS[1], ARGV[1]) return ARGV[1]"


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    client = get_bus().client
    key = f"{get_bus().prefix}:test:beside:{uuid.uuid4().hex}"
    client.set("beside-key", key)
    yield client
    client.delete(key, "beside-key")


def key_of(client: redis.Redis) -> str:
    return str(client.get("beside-key"))


def other_connection() -> redis.Redis:
    return redis.Redis.from_url(get_bus().url, decode_responses=True)


def test_beside_runs_once_the_script_is_sent_and_before_its_reply_is_read(client: redis.Redis) -> None:
    key, value = key_of(client), uuid.uuid4().hex
    script = client.register_script(SET_AND_RETURN)
    script(keys=[key], args=["loaded"])  # the server has it
    seen: list[str | None] = []
    watcher = other_connection()

    def beside() -> None:
        deadline = time.monotonic() + 2
        while watcher.get(key) != value and time.monotonic() < deadline:
            time.sleep(0.001)
        seen.append(watcher.get(key))  # the script's effect, visible before its reply is read

    assert script_beside(client, script, keys=[key], args=[value], beside=beside) == value
    assert seen == [value]
    watcher.close()


def test_a_server_without_the_script_gets_it_loaded_and_beside_still_runs_once(client: redis.Redis) -> None:
    key, value = key_of(client), uuid.uuid4().hex
    script = client.register_script(SET_AND_RETURN + " -- " + uuid.uuid4().hex)  # never loaded: NOSCRIPT
    calls: list[int] = []
    assert script_beside(client, script, keys=[key], args=[value], beside=lambda: calls.append(1)) == value
    assert calls == [1] and client.get(key) == value
    assert client.script_exists(script.sha) == [True]


def test_a_dead_pooled_connection_gets_the_ordinary_call_and_beside_still_runs_once(client: redis.Redis) -> None:
    key, value = key_of(client), uuid.uuid4().hex
    script = client.register_script(SET_AND_RETURN)
    script(keys=[key], args=["loaded"])
    pool = client.connection_pool
    conn = pool.get_connection()
    conn.send_command("CLIENT", "ID")
    ident = conn.read_response()
    pool.release(conn)
    killer = other_connection()
    assert killer.client_kill_filter(_id=ident) == 1  # Redis restarted, say: the pooled connection is gone
    killer.close()
    calls: list[int] = []
    assert script_beside(client, script, keys=[key], args=[value], beside=lambda: calls.append(1)) == value
    assert calls == [1] and client.get(key) == value


def test_a_beside_that_fails_leaves_no_unread_reply_in_the_pool(client: redis.Redis) -> None:
    """The script's reply was never read: the connection is closed, not pooled, or the
    next command on it would read that reply as its own."""
    key = key_of(client)
    script = client.register_script(SET_AND_RETURN)

    class Interrupted(BaseException):
        pass

    def beside() -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        script_beside(client, script, keys=[key], args=["the script's reply"], beside=beside)
    client.set(key, "mine")
    assert [client.get(key) for _ in range(3)] == ["mine"] * 3


def request_for(owner: TenantFixture, prompt: str, **data: Any) -> PromptRequest:
    return services.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": prompt, **data}, config=PipelineSettings())


@pytest.mark.django_db
def test_the_search_run_ahead_is_handed_to_its_stage_once(owner: TenantFixture) -> None:
    services.document_create(tenant=owner.tenant, title="Kettles", body="a kettle boils water")
    rag = RagConfig()
    request = request_for(owner, "kettle")
    ahead = services.ReadAhead(request, PipelineSettings(rag=rag))
    ahead.run()
    with CaptureQueriesContext(connection) as queries:
        found = ahead(**search_args(request, rag))
    assert [d.title for d in found.documents] == ["Kettles"] and len(queries) == 0  # no second search
    assert found.searched_ahead_ns > 0  # its time, for the stage to report
    with CaptureQueriesContext(connection) as queries:
        again = ahead(**search_args(request, rag))
    assert again.documents == found.documents and again.searched_ahead_ns == 0
    assert len(queries) >= 1  # asked again: searched again (in a savepoint here)
    ahead.run()
    other = dataclasses.replace(request, prompt="water")
    with CaptureQueriesContext(connection) as queries:
        assert [d.title for d in ahead(**search_args(other, rag)).documents] == ["Kettles"]
    assert len(queries) >= 1  # another query: its own search, not the one run ahead


@pytest.mark.django_db
def test_a_search_that_failed_ahead_fails_in_its_stage(owner: TenantFixture) -> None:
    rag = RagConfig(text_search_config="no_such_configuration")
    request = request_for(owner, "kettle")
    ahead = services.ReadAhead(request, PipelineSettings(rag=rag))
    ahead.run()  # Postgres refuses it: kept, not raised here
    with pytest.raises(DatabaseError, match="no_such_configuration"):
        ahead(**search_args(request, rag))


@pytest.mark.django_db(transaction=True)
def test_a_real_time_task_searches_beside_its_start(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    services.document_create(tenant=owner.tenant, title="Kettles", body="a kettle boils water")
    searches: list[tuple[RetrievalResult, bool, int]] = []
    real = selectors.document_search_ahead

    def recording(**args: Any) -> selectors.SearchAhead:
        started = time.perf_counter_ns()
        read = real(**args)
        took = time.perf_counter_ns() - started
        searches.append((read.result, any(frame.function == "script_beside" for frame in inspect.stack()), took))
        return read

    monkeypatch.setattr(selectors, "document_search_ahead", recording)
    monkeypatch.setattr(selectors, "document_search", lambda **_: pytest.fail("searched again in the stage"))
    request = request_for(owner, "kettle")
    services.realtime_execute(request.to_dict())
    done = get_bus().read_all(request.request_id)[-1]
    [(result, beside_the_start, took)] = searches  # one search, run while the start script's reply was awaited
    assert beside_the_start and [d.title for d in result.documents] == ["Kettles"]
    assert done.type == "done" and done.data["timings_us"]["rag"] >= took // 1000  # the search's time is the stage's


@pytest.mark.django_db(transaction=True)
def test_without_rag_nothing_is_searched_ahead(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch, pipeline_config: Any) -> None:
    pipeline_config(PipelineSettings(rag=RagConfig(enabled=False)))
    searched: list[object] = []
    monkeypatch.setattr(selectors, "document_search", lambda **args: searched.append(args))
    monkeypatch.setattr(selectors, "document_search_ahead", lambda **args: searched.append(args))
    request = request_for(owner, "kettle")
    services.realtime_execute(request.to_dict())
    assert get_bus().read_all(request.request_id)[-1].type == "done" and searched == []


TURNS_TABLE = "pipeline_sessionturn"


def chat_with_two_turns(owner: TenantFixture) -> None:
    for n, (question, reply) in enumerate((("my name is Ada", "hello Ada"), ("I like kettles", "noted"))):
        services.session_turns_append(request=dataclasses.replace(request_for(owner, question, session_id="chat"), request_id=f"earlier-{n}"), reply=reply)


@pytest.mark.django_db(transaction=True)
def test_a_sessions_turns_are_read_in_the_searchs_round_trip_and_handed_to_assemble_once(owner: TenantFixture) -> None:
    chat_with_two_turns(owner)
    stored = selectors.session_history(tenant_id=str(owner.tenant.id), session_id="chat", turns=10)
    assert len(stored) == 4
    request = request_for(owner, "kettle", session_id="chat")
    ahead = services.ReadAhead(request, PipelineSettings())
    with CaptureQueriesContext(connection) as queries:
        ahead.run()
    assert len(queries.captured_queries) == 1 and TURNS_TABLE in queries.captured_queries[0]["sql"]  # one round trip, both reads
    with CaptureQueriesContext(connection) as queries:
        ahead(**search_args(request, RagConfig()))
        assert ahead.load_history() == stored
    assert queries.captured_queries == []  # neither stage asks Postgres
    with CaptureQueriesContext(connection) as queries:
        assert ahead.load_history() == stored  # asked again: read again
    assert len(queries.captured_queries) == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("data", "settings"),
    [
        ({}, PipelineSettings()),  # no session named: a new one, with nothing stored
        ({"session_id": "chat", "history": [("user", "hi"), ("assistant", "hello")]}, PipelineSettings()),  # the client sent its conversation
        ({"session_id": "chat"}, PipelineSettings.model_validate({"assemble": {"history_turns": 0}})),  # no turns wanted
    ],
    ids=["no-session", "client-history", "no-turns"],
)
def test_no_turns_are_read_ahead_when_assemble_will_not_read_them(owner: TenantFixture, data: dict[str, Any], settings: PipelineSettings) -> None:
    chat_with_two_turns(owner)
    request = request_for(owner, "kettle", **data)
    ahead = services.ReadAhead(request, settings)
    with CaptureQueriesContext(connection) as queries:
        ahead.run()
    assert len(queries.captured_queries) == 1 and TURNS_TABLE not in queries.captured_queries[0]["sql"]  # the search alone
    # Asked all the same, it answers as the stage's own read would.
    assert ahead.load_history() == services.session_history_for(request, turns=settings.assemble.history_turns)


@pytest.mark.django_db(transaction=True)
def test_turns_the_search_could_not_bring_are_read_when_assemble_asks(owner: TenantFixture) -> None:
    chat_with_two_turns(owner)
    request = request_for(owner, "kettle", session_id="chat")
    ahead = services.ReadAhead(request, PipelineSettings(rag=RagConfig(text_search_config="no_such_configuration")))
    ahead.run()  # refused: neither read
    with CaptureQueriesContext(connection) as queries:
        assert [m.content for m in ahead.load_history()] == ["my name is Ada", "hello Ada", "I like kettles", "noted"]
    assert len(queries.captured_queries) == 1


@pytest.mark.django_db(transaction=True)
def test_a_real_time_task_of_a_session_reads_its_turns_beside_its_start(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import engine

    chat_with_two_turns(owner)
    reads: list[bool] = []
    assembled: list[tuple[Any, ...]] = []
    real_read, real_assemble = selectors.document_search_ahead, engine.assemble

    def reading(**args: Any) -> Any:
        reads.append(any(frame.function == "script_beside" for frame in inspect.stack()))
        return real_read(**args)

    def assembling(ctx: Any, **kwargs: Any) -> Any:
        assembled.append(ctx.history)
        return real_assemble(ctx, **kwargs)

    monkeypatch.setattr(selectors, "document_search_ahead", reading)
    monkeypatch.setattr(selectors, "session_history", lambda **_: pytest.fail("the turns were read apart from the search"))
    monkeypatch.setattr(engine, "assemble", assembling)
    request = request_for(owner, "what is my name?", session_id="chat")
    services.realtime_execute(request.to_dict())
    assert get_bus().read_all(request.request_id)[-1].type == "done"
    assert reads == [True]  # once, while the start script's reply was awaited
    [history] = assembled
    assert [m.content for m in history] == ["my name is Ada", "hello Ada", "I like kettles", "noted"]
