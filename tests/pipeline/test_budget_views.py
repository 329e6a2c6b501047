"""What tenants and operators see of budgets: the two endpoints, the admin pages, the
OpenAPI schema; and the rules at the edges: periods crossed by a request, a budget
of nothing, a request without a key."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis
from django.conf import settings

from pipeline.auth import api_key_issue
from pipeline.models import Budget, BudgetScope, UsageEntry
from pipeline.resilience import budget
from pipeline.resilience.budget import BudgetStore, Period, Scope
from pipeline.services import budgets
from pipeline.shared_redis import SharedRedis, set_redis
from tests.conftest import TenantFixture, free_port

pytestmark = pytest.mark.django_db(transaction=True)


# --- GET /api/v1/budgets and /api/v1/usage ----------------------------------------------


def test_a_key_sees_its_tenants_budgets_and_its_own_but_not_another_keys(owner: TenantFixture) -> None:
    other = api_key_issue(tenant=owner.tenant, name="other")
    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("10"), period="month")
    Budget.objects.create(tenant=owner.tenant, scope=BudgetScope.KEY, api_key=owner.issued.api_key, amount_usd=Decimal("2"), period="day")
    Budget.objects.create(tenant=owner.tenant, scope=BudgetScope.KEY, api_key=other.api_key, amount_usd=Decimal("3"), period="day")
    Budget.objects.create(tenant=owner.tenant, scope=BudgetScope.SESSION, session_id="chat-1", amount_usd=Decimal("0.5"), period="total")
    listed = owner.client.get("/api/v1/budgets").json()["budgets"]
    assert [(b["scope"], b["amount_usd"], b["api_key_prefix"], b["session_id"]) for b in listed] == [
        ("key", "2.000000", owner.issued.api_key.prefix, None),
        ("session", "0.500000", None, "chat-1"),
        ("tenant", "10.000000", None, None),
    ]
    assert all(b["spent_usd"] == "0" and b["reserved_usd"] == "0" for b in listed)
    tomorrow = (dt.datetime.now(tz=dt.UTC) + dt.timedelta(days=1)).date()
    assert listed[0]["resets_at"] == dt.datetime.combine(tomorrow, dt.time(), tzinfo=dt.UTC).isoformat()


def test_a_tenant_without_budgets_has_an_empty_list(owner: TenantFixture, outsider: TenantFixture) -> None:
    Budget.objects.create(tenant=outsider.tenant, amount_usd=Decimal("1"), period="day")
    assert owner.client.get("/api/v1/budgets").json() == {"budgets": []}


@pytest.mark.parametrize("path", ["/api/v1/budgets", "/api/v1/usage"])
def test_both_need_a_key(anon: Any, path: str) -> None:
    resp = anon.get(path)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "api_key_missing"


def test_usage_defaults_to_the_last_thirty_days(owner: TenantFixture) -> None:
    now = dt.datetime.now(tz=dt.UTC)
    for n, days_ago in enumerate([0, 29, 30]):
        UsageEntry.objects.create(
            tenant=owner.tenant, request_id=f"d{n}", worker="w", model="m", cost_usd=Decimal("1"), created_at=now - dt.timedelta(days=days_ago)
        )
    usage = owner.client.get("/api/v1/usage").json()
    assert usage["since"] == (now - dt.timedelta(days=29)).date().isoformat() and usage["until"] == now.date().isoformat()
    assert sorted(r["day"] for r in usage["usage"]) == sorted({(now - dt.timedelta(days=d)).date().isoformat() for d in (0, 29)})
    # since alone: from then to today; until alone: the thirty days before it.
    since = owner.client.get(f"/api/v1/usage?since={(now - dt.timedelta(days=30)).date().isoformat()}").json()
    assert len(since["usage"]) == 3
    until = owner.client.get(f"/api/v1/usage?until={(now - dt.timedelta(days=1)).date().isoformat()}").json()
    assert [r["day"] for r in until["usage"]] == [(now - dt.timedelta(days=d)).date().isoformat() for d in (30, 29)]


def test_the_openapi_schema_describes_both(owner: TenantFixture, anon: Any) -> None:
    schema = anon.get("/api/v1/schema/", HTTP_ACCEPT="application/json").json()
    assert schema["paths"]["/api/v1/budgets"]["get"]["operationId"] == "budgets"
    usage = schema["paths"]["/api/v1/usage"]["get"]
    assert usage["operationId"] == "usage" and {p["name"] for p in usage["parameters"]} >= {"since", "until"}
    assert "remaining_usd" in schema["components"]["schemas"]["BudgetOut"]["properties"]


# --- the admin ----------------------------------------------------------------------------


def test_the_admin_lists_the_ledger_read_only(owner: TenantFixture, staff: Any) -> None:
    UsageEntry.objects.create(
        tenant=owner.tenant, request_id="ledger-1", worker="openai", model="gpt-fake", cost_usd=Decimal("0.25"), created_at=dt.datetime.now(tz=dt.UTC)
    )
    page = staff.get("/admin/pipeline/usageentry/")
    assert page.status_code == 200 and "ledger-1" in page.content.decode() and "0.250000000" in page.content.decode()
    entry = UsageEntry.objects.get()
    assert staff.get("/admin/pipeline/usageentry/add/").status_code == 403
    assert staff.post(f"/admin/pipeline/usageentry/{entry.pk}/change/", {"cost_usd": "0"}).status_code == 403
    assert staff.post(f"/admin/pipeline/usageentry/{entry.pk}/delete/", {"post": "yes"}).status_code == 403
    entry.refresh_from_db()
    assert entry.cost_usd == Decimal("0.25")


def test_the_admin_adds_a_budget_and_redis_has_it_at_once(owner: TenantFixture, staff: Any) -> None:
    form = {"tenant": str(owner.tenant.id), "scope": "session", "api_key": "", "session_id": "chat-7", "amount_usd": "0.75", "period": "total"}
    assert staff.post("/admin/pipeline/budget/add/", form).status_code == 302
    item = Budget.objects.get()
    shared = budgets.get_redis()
    assert shared.client.hget(budget.definitions_key(shared.prefix, str(owner.tenant.id)), "session:chat-7") == f"{item.id}|750000000|total|session"
    again = staff.post("/admin/pipeline/budget/add/", form)
    assert again.status_code == 200 and "This session has a budget already." in again.content.decode()


def test_the_admin_shows_the_ledgers_figures_while_redis_is_down(owner: TenantFixture, staff: Any) -> None:
    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="month")
    UsageEntry.objects.create(tenant=owner.tenant, request_id="r", worker="w", model="m", cost_usd=Decimal("0.4"), created_at=dt.datetime.now(tz=dt.UTC))
    set_redis(SharedRedis(url=f"redis://127.0.0.1:{free_port()}/0", prefix="gone", socket_timeout_s=0.2))
    try:
        page = staff.get("/admin/pipeline/budget/").content.decode()
    finally:
        set_redis(None)
    assert '<td class="field-spent">0.4</td>' in page and '<td class="field-remaining">0.6</td>' in page
    # A month's budget starts again on the first of the next month, at midnight UTC.
    today = dt.datetime.now(tz=dt.UTC)
    first_of_next = (today.replace(day=1) + dt.timedelta(days=32)).replace(day=1)
    assert f'<td class="field-resets">{first_of_next:%Y-%m-%d} 00:00</td>' in page


# --- rules at the edges -----------------------------------------------------------------


@pytest.fixture
def store() -> Iterator[BudgetStore]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    prefix = f"bv{uuid.uuid4().hex[:8]}"
    yield BudgetStore(client, prefix=prefix)
    keys = client.keys(f"{prefix}:*")
    if keys:
        client.delete(*keys)
    client.close()


def define(store: BudgetStore, **fields: str) -> None:
    store._client.hset(budget.definitions_key(store.prefix, "t"), mapping={"loaded": "1", **fields})


def test_a_request_that_crosses_midnight_settles_on_the_day_it_reserved_on(store: BudgetStore) -> None:
    before = dt.datetime(2026, 12, 7, 23, 59, 59, tzinfo=dt.UTC).timestamp()
    after = before + 2
    define(store, tenant=budget.definition(1, 100, Period.DAY, Scope.TENANT))
    record = f"{store.prefix}:req:late"
    assert store.reserve(tenant_id="t", record_key=record, api_key_id=None, session_id="s", amount=60, now=before).budgets == 1
    assert store.settle(record, 50) == 60
    assert store.spend(1, Period.DAY, before) == (50, 0)
    assert store.spend(1, Period.DAY, after) is None  # the new day owes nothing for it


def test_a_budget_of_nothing_lets_only_what_costs_nothing_through(store: BudgetStore) -> None:
    define(store, tenant=budget.definition(1, 0, Period.TOTAL, Scope.TENANT))
    assert store.reserve(tenant_id="t", record_key=f"{store.prefix}:req:a", api_key_id=None, session_id="s", amount=1, now=0).over is not None
    assert store.reserve(tenant_id="t", record_key=f"{store.prefix}:req:b", api_key_id=None, session_id="s", amount=0, now=0).budgets == 1


def test_a_request_without_a_key_is_bound_by_no_keys_budget(store: BudgetStore) -> None:
    define(store, **{"key:5": budget.definition(1, 0, Period.TOTAL, Scope.KEY)})
    reserved = store.reserve(tenant_id="t", record_key=f"{store.prefix}:req:a", api_key_id=None, session_id="s", amount=10, now=0)
    assert reserved == budget.Reserved(budgets=0)
    assert store.reserve(tenant_id="t", record_key=f"{store.prefix}:req:b", api_key_id=5, session_id="s", amount=10, now=0).over is not None


def test_a_budgets_amount_is_counted_to_the_nano_dollar() -> None:
    assert budgets.limit_nano(Decimal("0.000001")) == 1000
    assert budgets.limit_nano(Decimal("12345678.123456")) == 12_345_678_123_456_000
    assert budgets.usd(1) == Decimal("1E-9") and budgets.usd(2_500_000_000) == Decimal("2.5")


def test_a_budget_names_its_target_in_words(owner: TenantFixture) -> None:
    key = Budget(tenant=owner.tenant, scope=BudgetScope.KEY, api_key=owner.issued.api_key, amount_usd=Decimal("1"), period="day")
    session = Budget(tenant=owner.tenant, scope=BudgetScope.SESSION, session_id="s-1", amount_usd=Decimal("2"), period="total")
    assert str(key) == f"owner key {owner.issued.api_key.id}: 1 USD day"
    assert str(session) == "owner session s-1: 2 USD total"
    assert str(UsageEntry(request_id="r-1", cost_usd=Decimal("0.5"))) == "r-1: 0.5 USD"


def test_postgres_itself_refuses_a_budget_that_names_the_wrong_target(owner: TenantFixture) -> None:
    from django.db import IntegrityError, transaction

    wrong = [
        {"scope": BudgetScope.TENANT, "api_key": owner.issued.api_key},
        {"scope": BudgetScope.TENANT, "session_id": "s"},
        {"scope": BudgetScope.KEY},
        {"scope": BudgetScope.KEY, "api_key": owner.issued.api_key, "session_id": "s"},
        {"scope": BudgetScope.SESSION},
        {"scope": BudgetScope.SESSION, "session_id": "s", "api_key": owner.issued.api_key},
        {"scope": BudgetScope.TENANT, "amount_usd": Decimal("-1")},
    ]
    for fields in wrong:
        with pytest.raises(IntegrityError), transaction.atomic():
            Budget.objects.create(tenant=owner.tenant, **{"amount_usd": Decimal("1"), "period": "day", **fields})
    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="day")
    with pytest.raises(IntegrityError), transaction.atomic():
        Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("2"), period="month")  # one per tenant
    assert Budget.objects.count() == 1


def test_a_rebuild_of_definitions_redis_has_is_a_no_op(owner: TenantFixture) -> None:
    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="day")
    tenant_id = str(owner.tenant.id)
    assert budgets.rebuild(tenant_id) is False  # published on save: already there
    shared = budgets.get_redis()
    shared.client.delete(budget.definitions_key(shared.prefix, tenant_id))
    assert budgets.rebuild(tenant_id) is True
    assert budgets.rebuild(tenant_id) is False  # a second process, a moment later
    assert shared.client.hget(budget.definitions_key(shared.prefix, tenant_id), "tenant") == f"{item.id}|1000000000|day|tenant"


def test_a_standing_says_where_a_budget_is_in_words_a_client_can_use(owner: TenantFixture) -> None:
    item = Budget(id=4, tenant=owner.tenant, scope=BudgetScope.KEY, api_key=owner.issued.api_key, amount_usd=Decimal("2.5"), period="month")
    resets = dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    standing = budgets.Standing(item, spent_nano=1_000_000_000, reserved_nano=250_000_000, resets_at=resets)
    assert standing.to_dict() == {
        "id": 4,
        "scope": "key",
        "api_key_prefix": owner.issued.api_key.prefix,
        "session_id": None,
        "period": "month",
        "amount_usd": "2.5",
        "spent_usd": "1",
        "reserved_usd": "0.25",
        "remaining_usd": "1.25",
        "resets_at": "2027-01-01T00:00:00+00:00",
    }
    overdrawn = budgets.Standing(item, spent_nano=3_000_000_000, reserved_nano=0, resets_at=None)
    assert overdrawn.remaining_nano == 0 and overdrawn.to_dict()["resets_at"] is None  # a budget lowered below its spend has nothing left


def test_a_request_that_does_not_wait_is_settled_all_the_same(owner: TenantFixture, realtime_worker: Any) -> None:
    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="day")
    queued = owner.client.post("/api/v1/infer", {"prompt": "later", "worker": "echo_priced", "max_tokens": 8, "wait": False}, format="json")
    assert queued.status_code == 202
    request_id = queued.json()["request_id"]
    deadline = time.monotonic() + 10
    while owner.client.get(f"/api/v1/status/{request_id}").json()["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    while (now := budgets.standings([item])[0]).reserved_nano and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (now.spent_nano, now.reserved_nano) == (8_000_000, 0)
    assert UsageEntry.objects.get(request_id=request_id).cost_usd == Decimal("0.008")


def test_what_requests_in_flight_hold_is_shown_apart_from_what_was_spent(owner: TenantFixture, unpublished: list[tuple[str, int]], fakes: Any) -> None:
    from pipeline.config import get_config
    from pipeline.services import start
    from tests.conftest import start_request

    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("0.02"), period="day")
    request = start.infer_build_request(
        tenant_id=str(owner.tenant.id), data={"prompt": "in flight", "worker": "echo_priced", "max_tokens": 8}, config=get_config(), tenant_has_documents=False
    )
    start_request(request)  # queued, not run: its worst case is held
    (listed,) = owner.client.get("/api/v1/budgets").json()["budgets"]
    assert (listed["spent_usd"], listed["reserved_usd"], listed["remaining_usd"]) == ("0", "0.008", "0.012")


def test_what_is_left_is_summed_by_tenant_and_scope_with_the_biggest_spenders_named(owner: TenantFixture, outsider: TenantFixture) -> None:
    from tests.conftest import make_tenant

    third = make_tenant("third")
    now = dt.datetime.now(tz=dt.UTC)
    for n, (who, cost) in enumerate([(owner, "3"), (outsider, "1"), (third, "0.5")]):
        UsageEntry.objects.create(tenant=who.tenant, request_id=f"s{n}", worker="w", model="m", cost_usd=Decimal(cost), session_id="a", created_at=now)
    for who in (owner, outsider, third):
        Budget.objects.create(tenant=who.tenant, amount_usd=Decimal("10"), period="month")
        Budget.objects.create(tenant=who.tenant, scope=BudgetScope.SESSION, session_id="a", amount_usd=Decimal("5"), period="total")
    left = budgets.remaining_by_tenant(labels=1)
    assert left == {
        (str(owner.tenant.id), "tenant"): Decimal("7"),
        (str(owner.tenant.id), "session"): Decimal("2"),
        ("other", "tenant"): Decimal("18.5"),  # 9 + 9.5
        ("other", "session"): Decimal("8.5"),  # 4 + 4.5
    }
    assert set(budgets.remaining_by_tenant(labels=5)) == {(str(t.tenant.id), s) for t in (owner, outsider, third) for s in ("tenant", "session")}


def test_the_scrape_shows_what_budgets_have_left(owner: TenantFixture, anon: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("4"), period="day")
    scraped = anon.get("/metrics").content.decode()
    samples = {
        (s.labels.get("tenant"), s.labels.get("scope")): s.value
        for f in text_string_to_metric_families(scraped)
        for s in f.samples
        if s.name == "orchestrator_budget_remaining_usd"
    }
    assert samples[(str(owner.tenant.id), "tenant")] == 4.0
