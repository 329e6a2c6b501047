"""Budgets through the platform: the gateway reserves, the real-time worker corrects
and settles, failures are refunded, the ledger agrees with Redis, and a Redis that is
down or lost its data never lets spend through uncounted."""

from __future__ import annotations

import datetime as dt
import json
import time
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.db import connection

from pipeline.config import get_config
from pipeline.models import Budget, BudgetScope, SessionTurn, UsageEntry, UsageOutcome
from pipeline.services import budgets
from pipeline.types import PromptRequest
from tests.conftest import Fakes, TenantFixture, WorkerProcess, delete_redis_keys

pytestmark = pytest.mark.django_db(transaction=True)

ANSWER_USD = Decimal("0.008")  # echo_priced: 8 answer tokens at 1,000 USD per million


def ask(tenant: TenantFixture, prompt: str, **body: Any) -> Any:
    return tenant.client.post("/api/v1/infer", {"prompt": prompt, "worker": "echo_priced", "max_tokens": 8, "dedup": False, **body}, format="json")


def standing(item: Budget) -> budgets.Standing:
    """The budget's figures once nothing is reserved: a run settles after its client
    has the answer, so a test that asks at once may be a moment early."""
    item.refresh_from_db()
    deadline = time.monotonic() + 5
    while (now := budgets.standings([item])[0]).reserved_nano and time.monotonic() < deadline:
        time.sleep(0.02)
    return now


def ledger_usd(tenant: TenantFixture, **where: Any) -> Decimal:
    return sum((e.cost_usd for e in UsageEntry.objects.filter(tenant=tenant.tenant, **where)), Decimal(0))


def test_the_tenant_budget_refuses_what_it_cannot_cover_with_402_naming_it(owner: TenantFixture, realtime_worker: WorkerProcess) -> None:
    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("0.02"), period="day")
    assert ask(owner, "one").status_code == 200
    assert ask(owner, "two").status_code == 200
    refused = ask(owner, "three")
    assert refused.status_code == 402
    error = refused.json()["error"]
    tomorrow = (dt.datetime.now(tz=dt.UTC) + dt.timedelta(days=1)).date()
    assert error["code"] == "budget_exceeded"
    assert error["data"] == {
        "budget_id": item.id,
        "scope": "tenant",
        "period": "day",
        "limit_usd": "0.02",
        "remaining_usd": "0.004",
        "resets_at": dt.datetime.combine(tomorrow, dt.time(), tzinfo=dt.UTC).isoformat(),
    }
    now = standing(item)
    assert (budgets.usd(now.spent_nano), now.reserved_nano) == (2 * ANSWER_USD, 0)


def test_the_openai_api_refuses_in_openais_shape(owner: TenantFixture, realtime_worker: WorkerProcess) -> None:
    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("0.001"), period="total")
    refused = owner.client.post(
        "/v1/chat/completions", {"model": "echo_priced/echo-priced-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}, format="json"
    )
    assert refused.status_code == 402
    assert refused.json()["error"]["type"] == "insufficient_quota" and refused.json()["error"]["code"] == "insufficient_quota"


def test_a_key_budget_binds_that_key_only(owner: TenantFixture, realtime_worker: WorkerProcess) -> None:
    from pipeline.auth import api_key_issue
    from tests.conftest import make_tenant

    Budget.objects.create(tenant=owner.tenant, scope=BudgetScope.KEY, api_key=owner.issued.api_key, amount_usd=Decimal("0.008"), period="month")
    assert ask(owner, "first").status_code == 200
    assert ask(owner, "second").status_code == 402
    other_key = api_key_issue(tenant=owner.tenant, name="second")
    other = make_tenant("unused")
    other.client.credentials(HTTP_AUTHORIZATION=f"Bearer {other_key.raw}")
    assert ask(other, "from another key of the same tenant").status_code == 200


def test_a_session_budget_binds_that_session_only(owner: TenantFixture, realtime_worker: WorkerProcess) -> None:
    Budget.objects.create(tenant=owner.tenant, scope=BudgetScope.SESSION, session_id="capped", amount_usd=Decimal("0.01"), period="total")
    assert ask(owner, "a", session_id="capped").status_code == 200
    refused = ask(owner, "b", session_id="capped")
    assert refused.status_code == 402 and refused.json()["error"]["data"]["scope"] == "session"
    assert ask(owner, "c", session_id="free").status_code == 200


def test_an_answer_from_deduplication_reserves_and_costs_nothing(owner: TenantFixture, realtime_worker: WorkerProcess, dedup_on: Any) -> None:
    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("0.01"), period="total")
    first = ask(owner, "the same question", dedup=True)
    again = ask(owner, "the same question", dedup=True)
    assert first.status_code == again.status_code == 200 and first.json()["text"] == again.json()["text"]
    assert budgets.usd(standing(item).spent_nano) == ANSWER_USD
    assert UsageEntry.objects.filter(tenant=owner.tenant).count() == 1


def test_a_failure_before_a_token_is_refunded(owner: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes) -> None:
    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="total")
    fakes.openai.mode = "500"
    failed = owner.client.post("/api/v1/infer", {"prompt": "fails", "worker": "openai", "max_tokens": 8}, format="json")
    assert failed.status_code == 503 and failed.json()["error"]["code"] == "worker_unavailable"
    now = standing(item)
    assert (now.spent_nano, now.reserved_nano) == (0, 0)
    assert not UsageEntry.objects.filter(tenant=owner.tenant).exists()


def test_a_failure_after_tokens_is_charged_its_reservation_and_recorded(owner: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes) -> None:
    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="total")
    fakes.openai.mode = "drop"
    failed = owner.client.post("/api/v1/infer", {"prompt": "drops", "worker": "openai", "max_tokens": 8, "stream": True}, format="json")

    async def drain() -> bytes:
        return b"".join([chunk async for chunk in failed.streaming_content])

    body = async_to_sync(drain)().decode()
    assert "event: token" in body and "worker_connection_error" in body
    # The run settles its gates after the client has the error: wait for the ledger's row.
    deadline = time.monotonic() + 5
    while not UsageEntry.objects.filter(tenant=owner.tenant).exists():
        assert time.monotonic() < deadline, "no ledger row for the failed request"
        time.sleep(0.02)
    now = standing(item)
    assert now.spent_nano > 0 and now.reserved_nano == 0
    (entry,) = UsageEntry.objects.filter(tenant=owner.tenant)
    assert entry.outcome == UsageOutcome.FAILED and budgets.limit_nano(entry.cost_usd) == now.spent_nano


def test_the_worker_refuses_when_the_assembled_prompt_does_not_fit(owner: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes) -> None:
    """The gateway cannot see the session's stored turns: the worker's correction
    does, and refuses before the provider is called."""
    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("0.5"), period="total")
    long_turn = "word " * 400  # 2,000 bytes: 2 USD of prompt at the openai worker's 1,000 USD per million
    SessionTurn.objects.bulk_create(
        [
            SessionTurn(tenant=owner.tenant, session_id="long", request_id=f"old-{n}", role=role, content=long_turn)
            for n, role in enumerate(["user", "assistant"])
        ]
    )
    asked_before = len(fakes.openai.requests)
    refused = owner.client.post("/api/v1/infer", {"prompt": "hi", "worker": "openai", "max_tokens": 8, "session_id": "long"}, format="json")
    assert refused.status_code == 402 and refused.json()["error"]["code"] == "budget_exceeded"
    assert len(fakes.openai.requests) == asked_before
    item = Budget.objects.get(tenant=owner.tenant)
    assert (standing(item).spent_nano, standing(item).reserved_nano) == (0, 0)
    # Without the stored turns the same request fits.
    assert owner.client.post("/api/v1/infer", {"prompt": "hi", "worker": "openai", "max_tokens": 8}, format="json").status_code == 200


def test_the_ledger_and_redis_agree_and_redis_is_rebuilt_from_the_ledger(owner: TenantFixture, realtime_worker: WorkerProcess) -> None:
    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("0.05"), period="month")
    for n in range(4):
        assert ask(owner, f"q{n}").status_code == 200
    redis_spent = standing(item).spent_nano
    assert budgets.usd(redis_spent) == ledger_usd(owner) == 4 * ANSWER_USD
    # Redis loses every budget key: the next start rebuilds them from Postgres.
    delete_redis_keys("budget*")
    assert ask(owner, "after the loss").status_code == 200
    assert budgets.usd(standing(item).spent_nano) == ledger_usd(owner) == 5 * ANSWER_USD
    assert ask(owner, "the sixth fits").status_code == 200
    assert ask(owner, "the seventh does not").status_code == 402  # 0.05 - 6 * 0.008 = 0.002 left


def test_a_budget_changed_in_the_admin_applies_to_the_next_request(owner: TenantFixture, realtime_worker: WorkerProcess, staff: Any) -> None:
    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="day")
    assert ask(owner, "before").status_code == 200
    form = {"tenant": str(owner.tenant.id), "scope": "tenant", "api_key": "", "session_id": "", "amount_usd": "0.01", "period": "day"}
    assert staff.post(f"/admin/pipeline/budget/{item.id}/change/", form).status_code == 302
    assert ask(owner, "after").status_code == 402
    form["amount_usd"] = "0.016"
    assert staff.post(f"/admin/pipeline/budget/{item.id}/change/", form).status_code == 302
    assert ask(owner, "raised").status_code == 200
    listing = staff.get("/admin/pipeline/budget/").content.decode()
    assert "0.016" in listing and "0E-9" not in listing and str(2 * ANSWER_USD) in listing


def test_the_admin_refuses_a_budget_that_names_the_wrong_target(owner: TenantFixture, staff: Any) -> None:
    form = {"tenant": str(owner.tenant.id), "scope": "key", "api_key": "", "session_id": "", "amount_usd": "1", "period": "day"}
    page = staff.post("/admin/pipeline/budget/add/", form)
    assert page.status_code == 200 and "a key budget names its key" in page.content.decode()
    assert not Budget.objects.exists()


def test_with_redis_down_a_request_under_a_budget_is_refused_and_others_run(owner: TenantFixture, redis_down: None) -> None:
    assert owner.client.post("/api/v1/infer", {"prompt": "no budget yet"}, format="json").status_code == 200
    Budget.objects.create(tenant=owner.tenant, scope=BudgetScope.SESSION, session_id="capped", amount_usd=Decimal("1"), period="day")
    refused = owner.client.post("/api/v1/infer", {"prompt": "under a budget", "session_id": "capped"}, format="json")
    assert refused.status_code == 503 and refused["Retry-After"] == "5"
    assert refused.json()["error"]["data"] == {"service": "redis", "reason": "budget", "retry_after": 5.0}
    assert owner.client.post("/api/v1/infer", {"prompt": "another session", "session_id": "free"}, format="json").status_code == 200


def test_a_budget_that_postgres_cannot_answer_for_is_a_503(owner: TenantFixture, redis_down: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from django.db import DatabaseError

    def broken(*_: object, **__: object) -> None:
        raise DatabaseError("server closed the connection")

    monkeypatch.setattr(connection, "ensure_connection", broken)
    with pytest.raises(Exception, match="postgres unavailable while trying to read the budgets"):
        budgets.apply_anywhere(str(owner.tenant.id), None, "s")


def test_budgets_and_usage_are_reported_to_the_tenant(owner: TenantFixture, outsider: TenantFixture, realtime_worker: WorkerProcess) -> None:
    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="month")
    Budget.objects.create(tenant=owner.tenant, scope=BudgetScope.KEY, api_key=owner.issued.api_key, amount_usd=Decimal("0.5"), period="total")
    Budget.objects.create(tenant=outsider.tenant, amount_usd=Decimal("9"), period="day")
    for n in range(3):
        assert ask(owner, f"u{n}").status_code == 200
    listed = owner.client.get("/api/v1/budgets").json()["budgets"]
    assert [(b["scope"], b["period"], b["amount_usd"], b["spent_usd"], b["remaining_usd"]) for b in listed] == [
        ("key", "total", "0.500000", "0.024", "0.476"),
        ("tenant", "month", "1.000000", "0.024", "0.976"),
    ]
    assert listed[0]["api_key_prefix"] == owner.issued.api_key.prefix and listed[0]["resets_at"] is None
    today = dt.datetime.now(tz=dt.UTC).date().isoformat()
    usage = owner.client.get("/api/v1/usage").json()
    assert usage["until"] == today
    prompt_tokens = sum(e.prompt_tokens for e in UsageEntry.objects.filter(tenant=owner.tenant))
    assert usage["usage"] == [
        {
            "day": today,
            "worker": "echo_priced",
            "model": "echo-priced-1",
            "requests": 3,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 24,
            "cost_usd": "0.024000000",
        }
    ]
    assert prompt_tokens >= 3
    assert outsider.client.get("/api/v1/usage").json()["usage"] == []


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("since=yesterday", "since"),
        ("until=2026-13-01", "until"),
        ("since=2026-12-02&until=2026-12-01", "since"),
        ("since=2020-01-01&until=2026-01-01", "since"),
    ],
)
def test_a_bad_usage_window_is_a_400_naming_the_field(owner: TenantFixture, query: str, field: str) -> None:
    resp = owner.client.get(f"/api/v1/usage?{query}")
    assert resp.status_code == 400 and resp.json()["error"]["data"] == {"field": field}


def test_a_streamed_answer_is_charged_its_cost_not_its_reservation(owner: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes) -> None:
    """Tokens reached the client, yet the answer completed: it settles with its usage."""
    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="total")
    resp = owner.client.post("/api/v1/infer", {"prompt": "stream it", "worker": "openai", "max_tokens": 64, "stream": True}, format="json")

    async def drain() -> bytes:
        return b"".join([chunk async for chunk in resp.streaming_content])

    body = async_to_sync(drain)().decode()
    assert "event: done" in body
    now = standing(item)
    (entry,) = UsageEntry.objects.filter(tenant=owner.tenant)
    prompt_tokens, completion_tokens = entry.prompt_tokens, entry.completion_tokens
    assert (now.spent_nano, now.reserved_nano) == (prompt_tokens * 1000 * 1000 + completion_tokens * 2000 * 1000, 0)
    assert now.spent_nano < budgets.worst_case_nano(
        PromptRequest(request_id="r", tenant_id="t", session_id="r", prompt="stream it", worker="openai", model="gpt-fake", max_tokens=64),
        get_config(),
        prompt_tokens,
    )


def test_the_openai_api_and_the_websocket_are_charged_alike(owner: TenantFixture, realtime_worker: WorkerProcess) -> None:
    from channels.testing import WebsocketCommunicator

    from orchestrator_site.asgi import application

    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="day")
    answer = owner.client.post(
        "/v1/chat/completions", {"model": "echo_priced/echo-priced-1", "messages": [{"role": "user", "content": "via v1"}], "max_tokens": 8}, format="json"
    )
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 8

    async def over_the_websocket() -> str:
        ws = WebsocketCommunicator(application, "/api/v1/stream", headers=[(b"authorization", f"Bearer {owner.key}".encode())])
        await ws.connect(timeout=10)
        await ws.receive_from(timeout=10)  # authenticated
        await ws.send_to(text_data=json.dumps({"type": "prompt", "prompt": "via ws", "worker": "echo_priced", "max_tokens": 8}))
        while (event := json.loads(await ws.receive_from(timeout=15)))["type"] not in ("done", "error"):
            pass
        await ws.disconnect()
        return str(event["type"])

    assert async_to_sync(over_the_websocket)() == "done"
    assert budgets.usd(standing(item).spent_nano) == 2 * ANSWER_USD
    assert sorted(UsageEntry.objects.filter(tenant=owner.tenant).values_list("model", flat=True)) == ["echo-priced-1", "echo-priced-1"]


def test_inline_answers_while_redis_is_down_are_in_the_ledger(owner: TenantFixture, redis_down: None) -> None:
    answer = owner.client.post("/api/v1/infer", {"prompt": "no redis", "worker": "echo_priced", "max_tokens": 8}, format="json")
    assert answer.status_code == 200
    (entry,) = UsageEntry.objects.filter(tenant=owner.tenant)
    assert (entry.worker, entry.cost_usd, entry.api_key_id) == ("echo_priced", ANSWER_USD, owner.issued.api_key.id)
