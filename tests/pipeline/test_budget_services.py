"""``services.budgets`` and the request's start under budgets, in this process against
the real Postgres and Redis: what a request may cost, the refusal's words, the
definitions copied to Redis, the ledger, the reports, and every degraded path."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.db import DatabaseError
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from orchestrator_site.errors import BudgetExceeded, InvalidRequest, NotFound, ServiceUnavailable
from pipeline import bounds
from pipeline.config import PipelineSettings, get_config
from pipeline.engine import PipelineDeps, run_pipeline
from pipeline.models import Budget, BudgetScope, UsageEntry, UsageOutcome
from pipeline.resilience import budget
from pipeline.resilience.budget import Over, Period, Scope
from pipeline.routing import worker_pool
from pipeline.services import budgets, execute, start
from pipeline.shared_redis import get_redis
from pipeline.stages.rag import RetrievalResult
from pipeline.tokenbus import get_bus
from pipeline.types import ChatMessage, GenerationOptions, PipelineResult, PromptRequest, Usage
from tests.conftest import Fakes, TenantFixture, start_request
from workers.types import AssembledPrompt

NOW = dt.datetime(2026, 12, 7, 15, 30, tzinfo=dt.UTC).timestamp()


@pytest.fixture(autouse=True)
def _suite_config(session_fakes: Fakes) -> None:
    """The suite's pipeline.toml (its priced echo worker)."""


def request_of(owner: TenantFixture | None = None, prompt: str = "hi", **fields: Any) -> PromptRequest:
    data = {"prompt": prompt, "worker": "echo_priced", "max_tokens": 8, **fields}
    return start.infer_build_request(
        tenant_id=str(owner.tenant.id) if owner else "not-a-tenant",
        api_key_id=owner.issued.api_key.id if owner else None,
        data=data,
        config=get_config(),
        tenant_has_documents=False,
    )


def definitions(tenant_id: str) -> dict[str, str]:
    shared = get_redis()
    return shared.client.hgetall(budget.definitions_key(shared.prefix, tenant_id))


# --- what a request may cost ---------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(prompt=st.text(min_size=1, max_size=200), history=st.lists(st.text(max_size=50), max_size=4))
def test_the_gateways_bound_is_at_least_the_utf8_bytes_it_can_see(prompt: str, history: list[str]) -> None:
    """No tokenizer makes more tokens of a text than it has UTF-8 bytes: a bound in
    bytes is an upper bound in tokens, whatever the provider's tokenizer."""
    messages = tuple(ChatMessage("user" if n % 2 == 0 else "assistant", text) for n, text in enumerate(history))
    request = PromptRequest(request_id="r", tenant_id="t", session_id="r", prompt=prompt, worker="echo", model="echo-1", max_tokens=1, history=messages)
    bound = budgets.gateway_prompt_bound(request, PipelineSettings())
    seen = sum(len(m.content.encode()) for m in messages) + len(prompt.encode())
    assert bound >= seen + bounds.MESSAGE_FRAMING_TOKENS * (len(messages) + 2)


def test_the_bound_adds_the_rag_context_at_most_and_the_tools() -> None:
    config = PipelineSettings()
    plain = PromptRequest(request_id="r", tenant_id="t", session_id="r", prompt="hi", worker="echo", model="echo-1", max_tokens=1, tenant_has_documents=False)
    with_documents = PromptRequest(**{**plain.__dict__, "tenant_has_documents": True})
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    with_tools = PromptRequest(**{**plain.__dict__, "options": GenerationOptions.from_dict({"tools": tools})})
    base = budgets.gateway_prompt_bound(plain, config)
    assert budgets.gateway_prompt_bound(with_documents, config) == base + 4 * config.rag.max_context_chars
    assert budgets.gateway_prompt_bound(with_tools, config) >= base + len(json.dumps(tools))


def test_the_worst_case_and_the_actual_cost_use_the_routed_workers_prices() -> None:
    config = get_config()
    request = request_of(max_tokens=8)
    assert budgets.worst_case_nano(request, config, 1_000) == 8 * 1000 * 1000  # echo_priced: prompt tokens are free
    openai = PromptRequest(**{**request.__dict__, "worker": "openai"})
    assert budgets.worst_case_nano(openai, config, 10) == 10 * 1000 * 1000 + 8 * 2000 * 1000
    result = PipelineResult(request_id="r", session_id="r", text="x", worker="openai", model="gpt-fake", finish_reason="stop", usage=Usage(3, 4), timings_us={})
    assert budgets.actual_nano(result, config) == 3 * 1000 * 1000 + 4 * 2000 * 1000


def test_the_refusal_names_the_budget_what_is_left_and_when_it_resets() -> None:
    error = budgets.exceeded(Over(7, Scope.KEY, 1_500_000, Period.MONTH, 10_000_000_000), now=NOW)
    assert isinstance(error, BudgetExceeded) and (error.http_status, error.ws_close_code) == (402, 4402)
    assert error.message == "the key budget 7 (10 USD month) has 0.0015 USD left, less than this request may cost"
    assert error.data == {
        "budget_id": 7,
        "scope": "key",
        "period": "month",
        "limit_usd": "10",
        "remaining_usd": "0.0015",
        "resets_at": "2027-01-01T00:00:00+00:00",
    }
    assert budgets.exceeded(Over(1, Scope.TENANT, 0, Period.TOTAL, 5), now=NOW).data["resets_at"] is None


# --- the engine's hook ----------------------------------------------------------------


def test_a_refusal_before_inference_stops_the_run_before_the_worker_is_called() -> None:
    called: list[AssembledPrompt] = []
    config = get_config()
    worker = worker_pool.get(config, "echo")

    def refuse(prompt: AssembledPrompt) -> None:
        called.append(prompt)
        raise BudgetExceeded("over", data={"budget_id": 1})

    deps = PipelineDeps(
        config=config, retrieve=lambda *_, **__: RetrievalResult(()), load_history=lambda: (), worker=worker, publish=lambda _: None, before_inference=refuse
    )
    request = PromptRequest(request_id="r", tenant_id="t", session_id="r", prompt="stop here", worker="echo", model="echo-1", max_tokens=8)
    observed: list[tuple[str, str, int]] = []
    with pytest.raises(BudgetExceeded):
        run_pipeline(request, deps, observed)
    assert [m.content for m in called[0].messages][-1] == "stop here"
    assert [(stage, outcome) for stage, outcome, _ in observed] == [("rag", "miss"), ("assemble", "ok"), ("inference", "budget_exceeded")]


# --- definitions in Redis ---------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_budget_saved_or_deleted_reaches_redis_when_it_commits(owner: TenantFixture) -> None:
    tenant_id = str(owner.tenant.id)
    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1.5"), period="day")
    assert definitions(tenant_id) == {"loaded": "1", "tenant": f"{item.id}|1500000000|day|tenant"}
    session = Budget.objects.create(tenant=owner.tenant, scope=BudgetScope.SESSION, session_id="s", amount_usd=Decimal("0.25"), period="total")
    assert definitions(tenant_id)["session:s"] == f"{session.id}|250000000|total|session"
    item.delete()
    assert definitions(tenant_id) == {"loaded": "1", "session:s": f"{session.id}|250000000|total|session"}


@pytest.mark.django_db(transaction=True)
def test_a_budget_new_in_its_period_counts_what_the_ledger_already_has(owner: TenantFixture) -> None:
    now = dt.datetime.now(tz=dt.UTC)
    for n, (when, cost) in enumerate([(now, "0.30"), (now - dt.timedelta(days=40), "5.00")]):
        UsageEntry.objects.create(
            tenant=owner.tenant, request_id=f"old-{n}", worker="openai", model="m", cost_usd=Decimal(cost), created_at=when, session_id="s"
        )
    month = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="month")
    total = Budget.objects.create(tenant=owner.tenant, scope=BudgetScope.SESSION, session_id="s", amount_usd=Decimal("10"), period="total")
    month_now, total_now = budgets.standings([month, total])
    assert budgets.usd(month_now.spent_nano) == Decimal("0.30")  # last month's 5 USD is not this month's
    assert budgets.usd(total_now.spent_nano) == Decimal("5.30")
    assert (month_now.remaining_nano, total_now.remaining_nano) == (700_000_000, 4_700_000_000)


@pytest.mark.django_db(transaction=True)
def test_a_tenant_redis_never_heard_of_is_loaded_once_then_started(owner: TenantFixture, unpublished: list[tuple[str, int]]) -> None:
    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="total")
    shared = get_redis()
    shared.client.delete(budget.definitions_key(shared.prefix, str(owner.tenant.id)))
    request = request_of(owner)
    started = start_request(request)
    assert started.kind is start.StartKind.SUBMITTED
    assert definitions(str(owner.tenant.id))["tenant"] == f"{item.id}|1000000000|total|tenant"
    assert get_bus().get_record(request.request_id)["reserved"] == str(8 * 1000 * 1000)


@pytest.mark.django_db(transaction=True)
def test_definitions_redis_loses_again_at_once_refuse_the_request(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budgets, "rebuild", lambda tenant_id, **_: False)  # another process's rebuild, lost before the start
    with pytest.raises(ServiceUnavailable, match="the budgets could not be loaded") as refused:
        start_request(request_of(owner))
    assert refused.value.retry_after == 1.0


@pytest.mark.django_db(transaction=True)
def test_postgres_down_while_loading_the_budgets_is_a_503_naming_postgres(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = get_redis()
    shared.client.delete(budget.definitions_key(shared.prefix, str(owner.tenant.id)))

    def broken(self: Any, *_: Any, **__: Any) -> Any:
        raise DatabaseError("connection refused")

    monkeypatch.setattr("django.db.models.query.QuerySet._fetch_all", broken)
    with pytest.raises(ServiceUnavailable) as refused:
        start_request(request_of(owner))
    assert refused.value.data == {"service": "postgres"} and refused.value.retry_after == 5.0


def test_a_tenant_id_that_is_no_uuid_has_no_budgets() -> None:
    """A start for such an id (a test's, a batch's synthetic one) asks no database."""
    assert budgets.apply_anywhere("not-a-tenant", None, "s") is False
    assert budgets.rebuild("not-a-tenant") in (True, False)
    assert definitions("not-a-tenant") == {"loaded": "1"}


@pytest.mark.django_db(transaction=True)
def test_redis_down_while_publishing_is_logged_and_the_budget_kept(owner: TenantFixture, redis_down: None) -> None:
    with capture_logs() as logs:
        item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="day")
    assert Budget.objects.filter(pk=item.pk).exists()
    assert [(e["event"], e["tenant_id"], e["outcome"]) for e in logs if e["event"] == "budgets_unpublished"] == [
        ("budgets_unpublished", str(owner.tenant.id), "degraded")
    ]


# --- a refusal at the start leaves nothing behind -----------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_request_refused_by_its_budget_leaves_no_slot_count_or_claim(owner: TenantFixture, dedup_on: PipelineSettings) -> None:
    from pipeline.resilience import admission, dedup, ratelimit
    from pipeline.resilience.dedup import dedup_key
    from pipeline.resilience.ratelimit import TenantRates

    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("0.001"), period="total")
    request = request_of(owner, "too dear", temperature=0)
    with pytest.raises(BudgetExceeded):
        start_request(request, TenantRates(requests_per_minute=100))
    client, prefix = get_redis().client, get_redis().prefix
    tenant_id = str(owner.tenant.id)
    requests_log, _ = ratelimit.keys(prefix, tenant_id)
    assert client.zscore(requests_log, request.request_id) is None
    assert all(client.zscore(key, request.request_id) is None for key in admission.keys(prefix, tenant_id))
    inflight, _, _ = dedup.keys(prefix, dedup_key(request))
    assert client.get(inflight) is None
    assert not client.exists(get_bus().record_key(request.request_id))


@pytest.mark.django_db(transaction=True)
def test_the_websocket_refuses_with_an_error_event_of_the_code(owner: TenantFixture) -> None:
    from channels.testing import WebsocketCommunicator

    from orchestrator_site.asgi import application

    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("0"), period="total")

    async def scenario() -> dict[str, Any]:
        ws = WebsocketCommunicator(application, "/api/v1/stream", headers=[(b"authorization", f"Bearer {owner.key}".encode())])
        await ws.connect(timeout=10)
        await ws.receive_from(timeout=10)  # authenticated
        await ws.send_to(text_data=json.dumps({"type": "prompt", "prompt": "hi", "worker": "echo_priced", "max_tokens": 8}))
        event = json.loads(await ws.receive_from(timeout=10))
        await ws.disconnect()
        return event

    event = async_to_sync(scenario)()
    assert event["type"] == "error" and event["code"] == "budget_exceeded"
    assert event["data"]["remaining_usd"] == "0"


# --- the worker's side ----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_unbudgeted_run_writes_its_ledger_row_and_asks_redis_nothing_more(owner: TenantFixture, unpublished: list[tuple[str, int]]) -> None:
    request = request_of(owner, "free to run")
    start_request(request)
    assert "reserved" not in get_bus().get_record(request.request_id)
    execute.realtime_execute(request.request_id, 1)
    (entry,) = UsageEntry.objects.filter(request_id=request.request_id)
    assert (entry.worker, entry.model, entry.completion_tokens, entry.cost_usd, entry.outcome) == (
        "echo_priced",
        "echo-priced-1",
        8,
        Decimal("0.008"),
        UsageOutcome.ANSWERED,
    )
    assert entry.api_key_id == owner.issued.api_key.id and entry.attempt == 1


@pytest.mark.django_db(transaction=True)
def test_a_later_attempts_ledger_row_replaces_an_earlier_ones_and_never_the_reverse(owner: TenantFixture) -> None:
    from pipeline.services import sessions

    request = request_of(owner, "twice")
    result = PipelineResult(
        request_id=request.request_id,
        session_id=request.session_id,
        text="a",
        worker="echo_priced",
        model="m",
        finish_reason="stop",
        usage=Usage(1, 2),
        timings_us={},
    )
    row = budgets.ledger_row(result, cost_nano=2_000_000)
    assert sessions.session_turns_append(request=request, reply="a", attempt=2, usage=row)
    assert sessions.session_turns_append(request=request, reply="b", attempt=1, usage={**row, "cost_usd": budgets.usd(9)})
    (entry,) = UsageEntry.objects.filter(request_id=request.request_id)
    assert (entry.attempt, entry.cost_usd) == (2, Decimal("0.002"))
    assert sessions.session_turns_append(request=request, reply="c", attempt=3, usage={**row, "completion_tokens": 5})
    entry.refresh_from_db()
    assert (entry.attempt, entry.completion_tokens) == (3, 5)


@pytest.mark.django_db(transaction=True)
def test_redis_down_at_a_failures_release_is_logged_and_charges_nothing(owner: TenantFixture, redis_down: None) -> None:
    with capture_logs() as logs:
        assert budgets.release("a-request") == 0
    assert [e["event"] for e in logs] == ["budget_unreleased"]


@pytest.mark.django_db(transaction=True)
def test_postgres_refusing_the_ledger_row_is_logged_and_the_answer_stands(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any, **__: Any) -> None:
        raise DatabaseError("disk full")

    monkeypatch.setattr(UsageEntry.objects, "bulk_create", broken)
    request = request_of(owner)
    with capture_logs() as logs:
        budgets.ledger_write_safely(request, worker="echo_priced", model="m", prompt_tokens=1, completion_tokens=1, cost_nano=1, outcome=UsageOutcome.FAILED)
    assert [(e["event"], e["request_id"], e["error_type"]) for e in logs] == [("usage_unrecorded", request.request_id, "DatabaseError")]


# --- operators and reports ------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_standings_come_from_the_ledger_while_redis_is_down(owner: TenantFixture) -> None:
    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="day")
    UsageEntry.objects.create(tenant=owner.tenant, request_id="r1", worker="w", model="m", cost_usd=Decimal("0.25"), created_at=dt.datetime.now(tz=dt.UTC))
    from pipeline.shared_redis import SharedRedis, set_redis
    from tests.conftest import free_port

    set_redis(SharedRedis(url=f"redis://127.0.0.1:{free_port()}/0", prefix="gone", socket_timeout_s=0.2))
    try:
        (now,) = budgets.standings([item])
    finally:
        set_redis(None)
    assert (budgets.usd(now.spent_nano), now.reserved_nano, budgets.usd(now.remaining_nano)) == (Decimal("0.25"), 0, Decimal("0.75"))
    assert now.to_dict()["resets_at"] == budget.resets_at(Period.DAY, dt.datetime.now(tz=dt.UTC).timestamp()).isoformat()


@pytest.mark.django_db(transaction=True)
def test_budget_set_creates_changes_and_refuses(owner: TenantFixture, outsider: TenantFixture) -> None:
    first = budgets.budget_set(tenant="owner", amount_usd=Decimal("3"), period="day")
    again = budgets.budget_set(tenant="owner", amount_usd=Decimal("4.5"), period="month")
    assert first.id == again.id and (again.amount_usd, again.period) == (Decimal("4.500000"), "month")
    on_key = budgets.budget_set(key_prefix=outsider.issued.api_key.prefix, amount_usd=Decimal("1"), period="total")
    assert (on_key.tenant_id, on_key.scope, on_key.api_key_id) == (outsider.tenant.id, "key", outsider.issued.api_key.id)
    on_session = budgets.budget_set(tenant="outsider", session_id="s-9", amount_usd=Decimal("0"), period="day")
    assert (on_session.scope, on_session.session_id, on_session.amount_usd) == ("session", "s-9", Decimal("0"))
    with pytest.raises(InvalidRequest, match="0 or more"):
        budgets.budget_set(tenant="owner", amount_usd=Decimal("-0.01"), period="day")
    with pytest.raises(InvalidRequest, match="0 or more"):
        budgets.budget_set(tenant="owner", amount_usd=Decimal("Infinity"), period="day")
    with pytest.raises(InvalidRequest, match="period must be one of"):
        budgets.budget_set(tenant="owner", amount_usd=Decimal("1"), period="year")
    with pytest.raises(NotFound, match="no tenant named 'ghost'"):
        budgets.budget_set(tenant="ghost", amount_usd=Decimal("1"), period="day")
    from pipeline.auth import api_key_revoke

    api_key_revoke(api_key=outsider.issued.api_key)
    with pytest.raises(NotFound, match="no single live API key"):
        budgets.budget_set(key_prefix=outsider.issued.api_key.prefix, amount_usd=Decimal("1"), period="day")
    assert Budget.objects.count() == 3


@pytest.mark.django_db(transaction=True)
def test_usage_is_grouped_by_utc_day_worker_and_model(owner: TenantFixture, outsider: TenantFixture) -> None:
    day = dt.datetime(2026, 11, 30, 23, 59, tzinfo=dt.UTC)
    rows = [
        (owner, day, "openai", "gpt-fake", "0.5"),
        (owner, day, "openai", "gpt-fake", "0.25"),
        (owner, day + dt.timedelta(minutes=2), "openai", "gpt-fake", "1"),  # the next UTC day
        (owner, day, "echo", "echo-1", "0"),
        (outsider, day, "openai", "gpt-fake", "9"),
    ]
    for n, (who, when, worker, model, cost) in enumerate(rows):
        UsageEntry.objects.create(
            tenant=who.tenant, request_id=f"u{n}", worker=worker, model=model, prompt_tokens=n, completion_tokens=1, cost_usd=Decimal(cost), created_at=when
        )
    report = budgets.usage_by_day(str(owner.tenant.id), since=day - dt.timedelta(days=1), until=day + dt.timedelta(days=2))
    assert [(r["day"], r["worker"], r["model"], r["requests"], r["prompt_tokens"], r["cost_usd"]) for r in report] == [
        ("2026-11-30", "echo", "echo-1", 1, 3, "0E-9"),
        ("2026-11-30", "openai", "gpt-fake", 2, 1, "0.750000000"),
        ("2026-12-01", "openai", "gpt-fake", 1, 2, "1.000000000"),
    ]
    december = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    assert [r["day"] for r in budgets.usage_by_day(str(owner.tenant.id), since=december, until=december + dt.timedelta(days=1))] == ["2026-12-01"]


@pytest.mark.django_db(transaction=True)
def test_a_read_in_an_executor_thread_hands_its_connection_back(owner: TenantFixture) -> None:
    """Django closes a request thread's connection; an executor thread's it would keep
    for ever, holding a pool slot (or a connection that broke)."""
    import threading

    from django.db import connection

    seen: dict[str, object] = {}

    def in_a_thread() -> None:
        seen["applies"] = start._returning_the_connection(budgets.apply_anywhere, str(owner.tenant.id), None, "s")
        seen["open after"] = connection.connection is not None

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == {"applies": False, "open after": False}


@pytest.mark.django_db(transaction=True)
def test_the_key_travels_with_the_request_to_the_worker(owner: TenantFixture, unpublished: list[tuple[str, int]]) -> None:
    from pipeline.tokenbus import fencing

    Budget.objects.create(tenant=owner.tenant, scope=BudgetScope.KEY, api_key=owner.issued.api_key, amount_usd=Decimal("1"), period="day")
    request = request_of(owner)
    assert PromptRequest.from_dict(request.to_dict()).api_key_id == owner.issued.api_key.id
    start_request(request)
    begun = fencing.begin(get_bus(), fencing.Run.new(request.request_id, 1), lease_s=5, executed_by="test")
    assert begun.payload is not None and begun.payload["api_key_id"] == owner.issued.api_key.id
    assert begun.reserved_nano == 8 * 1000 * 1000  # the worker knows a budget holds it: it corrects and settles


@pytest.mark.django_db(transaction=True)
def test_a_refusal_comes_before_any_stream_opens(owner: TenantFixture) -> None:
    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("0"), period="total")
    streamed = owner.client.post("/api/v1/infer", {"prompt": "hi", "worker": "echo_priced", "max_tokens": 8, "stream": True}, format="json")
    assert streamed.status_code == 402 and streamed.json()["error"]["code"] == "budget_exceeded"
    body = {"model": "echo_priced/echo-priced-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}
    openai = owner.client.post("/v1/chat/completions", body, format="json")
    assert openai.status_code == 402 and openai.json()["error"]["type"] == "insufficient_quota"


@pytest.mark.django_db(transaction=True)
def test_a_tenant_deleted_with_its_budgets_leaves_none_in_redis(owner: TenantFixture) -> None:
    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="day")
    tenant_id = str(owner.tenant.id)
    assert "tenant" in definitions(tenant_id)
    owner.tenant.delete()
    assert not Budget.objects.filter(tenant_id=tenant_id).exists()
    assert definitions(tenant_id) == {"loaded": "1"}


def test_the_bound_counts_a_conversations_tool_calls_and_results() -> None:
    from pipeline.types import ToolCall

    call = ToolCall(id="call_1", name="lookup", arguments='{"city": "Zürich", "days": 14}')
    turns = (ChatMessage("assistant", "", tool_calls=(call,)), ChatMessage("tool", "Sunny, 21 °C", tool_call_id="call_1"))
    bare = PromptRequest(
        request_id="r", tenant_id="t", session_id="r", prompt="weather?", worker="echo", model="echo-1", max_tokens=1, tenant_has_documents=False
    )
    with_tools = PromptRequest(**{**bare.__dict__, "tool_turns": turns})
    extra = budgets.gateway_prompt_bound(with_tools, PipelineSettings()) - budgets.gateway_prompt_bound(bare, PipelineSettings())
    assert extra >= len(call.arguments.encode()) + len("Sunny, 21 °C".encode()) + 2 * bounds.MESSAGE_FRAMING_TOKENS


@pytest.mark.django_db(transaction=True)
def test_setting_a_budget_without_postgres_says_so(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Any, *_: Any, **__: Any) -> Any:
        raise DatabaseError("server closed the connection unexpectedly")

    monkeypatch.setattr("django.db.models.query.QuerySet._fetch_all", broken)
    with pytest.raises(ServiceUnavailable, match="postgres unavailable while trying to write the budget") as refused:
        budgets.budget_set(tenant="owner", amount_usd=Decimal("1"), period="day")
    assert refused.value.data == {"service": "postgres"}
    assert refused.value.retry_after == 5.0
