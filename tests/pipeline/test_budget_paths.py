"""Every way a budgeted request can end, run in this process against the real Postgres
and Redis: answered, refused at the start by another gate, run on a fallback, timed
out, cancelled, revoked. Each leaves its budgets exactly charged or exactly refunded.
And the arithmetic against a model: any interleaving of reservations, corrections,
settlements and releases keeps every budget within its limit."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
import redis
from django.conf import settings
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orchestrator_site.errors import BudgetExceeded, Overloaded, RateLimited
from pipeline.config import BreakerConfig, LimitsConfig, PipelineSettings, get_config, set_config
from pipeline.models import Budget, BudgetScope, UsageEntry, UsageOutcome
from pipeline.resilience import budget
from pipeline.resilience.budget import BudgetStore, Period, Scope
from pipeline.resilience.ratelimit import TenantRates
from pipeline.services import budgets, execute, gates, leases, start
from pipeline.tokenbus import get_bus
from tests.conftest import Fakes, TenantFixture, start_request

pytestmark = pytest.mark.django_db(transaction=True)

ANSWER_NANO = 8_000_000  # echo_priced: 8 answer tokens at 1,000 USD per million


def request_of(owner: TenantFixture, prompt: str = "hi", config: PipelineSettings | None = None, **fields: Any) -> Any:
    return start.infer_build_request(
        tenant_id=str(owner.tenant.id),
        api_key_id=owner.issued.api_key.id,
        data={"prompt": prompt, "worker": "echo_priced", "max_tokens": 8, **fields},
        config=config or get_config(),
        tenant_has_documents=False,
    )


def figures(item: Budget) -> tuple[int, int]:
    (now,) = budgets.standings([item])
    return now.spent_nano, now.reserved_nano


@pytest.fixture
def tenant_budget(owner: TenantFixture, fakes: Fakes) -> Budget:
    return Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="total")


# --- refused by another gate: nothing reserved ------------------------------------------


def test_a_rate_limited_request_reserves_nothing(owner: TenantFixture, tenant_budget: Budget, unpublished: list[tuple[str, int]]) -> None:
    rates = TenantRates(requests_per_minute=1)
    start_request(request_of(owner, "first"), rates)
    with pytest.raises(RateLimited):
        start_request(request_of(owner, "second"), rates)
    assert figures(tenant_budget) == (0, ANSWER_NANO)  # the first one's only


def test_a_shed_request_reserves_nothing(owner: TenantFixture, tenant_budget: Budget, unpublished: list[tuple[str, int]]) -> None:
    config = get_config().model_copy(update={"limits": LimitsConfig(max_inflight_per_tenant=1, max_prompt_chars=2000)})
    set_config(config)
    try:
        start_request(request_of(owner, "holds the slot", config))
        with pytest.raises(Overloaded):
            start_request(request_of(owner, "one too many", config))
    finally:
        set_config(None)
    assert figures(tenant_budget) == (0, ANSWER_NANO)


def test_an_identical_request_in_flight_attaches_without_a_reservation(
    owner: TenantFixture, tenant_budget: Budget, unpublished: list[tuple[str, int]], dedup_on: PipelineSettings
) -> None:
    first = start_request(request_of(owner, "same", temperature=0))
    second = start_request(request_of(owner, "same", temperature=0))
    assert (first.kind, second.kind) == (start.StartKind.SUBMITTED, start.StartKind.ATTACHED)
    assert figures(tenant_budget) == (0, ANSWER_NANO)
    execute.realtime_execute(first.request_id, 1)
    assert figures(tenant_budget) == (ANSWER_NANO, 0)


# --- ended in the worker ----------------------------------------------------------------


def test_an_answer_settles_exactly_its_cost_on_every_budget_that_applies(
    owner: TenantFixture, tenant_budget: Budget, unpublished: list[tuple[str, int]]
) -> None:
    key_budget = Budget.objects.create(tenant=owner.tenant, scope=BudgetScope.KEY, api_key=owner.issued.api_key, amount_usd=Decimal("1"), period="day")
    session_budget = Budget.objects.create(tenant=owner.tenant, scope=BudgetScope.SESSION, session_id="s", amount_usd=Decimal("1"), period="month")
    request = request_of(owner, session_id="s")
    start_request(request)
    assert [figures(b) for b in (tenant_budget, key_budget, session_budget)] == [(0, ANSWER_NANO)] * 3
    execute.realtime_execute(request.request_id, 1)
    assert [figures(b) for b in (tenant_budget, key_budget, session_budget)] == [(ANSWER_NANO, 0)] * 3
    assert "reserved" not in get_bus().get_record(request.request_id)  # settled once, and gone


@pytest.fixture
def priced_flaky(fakes: Fakes, clean_breakers: None) -> Iterator[PipelineSettings]:
    """``flaky`` with the openai worker's prices, and its circuit open: echo, free, answers."""
    base = get_config()
    flaky = base.workers["flaky"].model_copy(
        update={"price_input_per_mtok": 1000.0, "price_output_per_mtok": 2000.0, "breaker": BreakerConfig(failure_threshold=1, open_s=60)}
    )
    config = base.model_copy(update={"workers": {**base.workers, "flaky": flaky}})
    set_config(config)
    gates.breaker_for(config, "flaky").record(success=False)
    yield config
    set_config(base)


def test_a_request_run_on_the_fallback_is_charged_at_the_fallbacks_prices(
    owner: TenantFixture, priced_flaky: PipelineSettings, unpublished: list[tuple[str, int]]
) -> None:
    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("100"), period="total")
    request = request_of(owner, "expensive worker, free fallback", priced_flaky, worker="flaky")
    start_request(request)
    assert figures(item)[1] > 0  # reserved at flaky's prices
    execute.realtime_execute(request.request_id, 1)
    last = get_bus().read_all(request.request_id)[-1]
    assert (last.type, last.data["worker"]) == ("done", "echo")
    assert figures(item) == (0, 0)  # corrected to echo's prices (none) before the call, settled at them
    (entry,) = UsageEntry.objects.filter(request_id=request.request_id)
    assert (entry.worker, entry.cost_usd) == ("echo", Decimal("0E-9"))


def test_a_run_past_its_deadline_is_refunded(owner: TenantFixture, fakes: Fakes, clean_breakers: None, unpublished: list[tuple[str, int]]) -> None:
    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("100"), period="total")
    fakes.openai.mode, fakes.openai.hang_s = "hang", 3.0
    base = get_config()
    config = base.model_copy(update={"limits": LimitsConfig(request_timeout_s=0.5, max_prompt_chars=2000)})
    set_config(config)
    try:
        request = request_of(owner, "slow", config, worker="openai")
        start_request(request)
        assert figures(item)[1] > 0
        execute.realtime_execute(request.request_id, 1)
    finally:
        set_config(base)
    assert get_bus().read_all(request.request_id)[-1].data["code"] == "worker_timeout"
    assert figures(item) == (0, 0)


def test_a_run_whose_readers_left_after_its_first_token_is_charged_its_reservation(
    owner: TenantFixture, tenant_budget: Budget, unpublished: list[tuple[str, int]], fakes: Fakes
) -> None:
    request = request_of(owner, "long answer", worker="openai")
    start_request(request)
    bus = get_bus()
    bus.redis.client.zadd(bus.readers_key(request.request_id), {"gone-reader": 0})  # one reader, whose lease lapsed long ago
    execute.realtime_execute(request.request_id, 1)
    assert bus.read_all(request.request_id)[-1].data["code"] == "request_cancelled"
    spent, reserved = figures(tenant_budget)
    assert spent > 0 and reserved == 0  # a token went out: the provider billed something, so the whole hold is spent
    (entry,) = UsageEntry.objects.filter(request_id=request.request_id)
    assert (entry.outcome, budgets.limit_nano(entry.cost_usd)) == (UsageOutcome.FAILED, spent)


def test_a_revoked_request_is_refunded(owner: TenantFixture, tenant_budget: Budget, unpublished: list[tuple[str, int]]) -> None:
    request = request_of(owner, "never runs")
    start_request(request)
    assert figures(tenant_budget) == (0, ANSWER_NANO)
    leases.message_revoked(request.request_id)
    assert figures(tenant_budget) == (0, 0)
    assert not UsageEntry.objects.exists()


def test_a_request_whose_worker_is_lost_before_a_token_keeps_its_reservation_for_the_next_attempt(
    owner: TenantFixture, tenant_budget: Budget, unpublished: list[tuple[str, int]]
) -> None:
    request = request_of(owner, "lost once")
    start_request(request)
    bus = get_bus()
    bus.redis.client.zadd(bus.leases_key, {request.request_id: 0})  # its lease lapsed: the sweep publishes attempt 2
    leases.sweep(get_config())
    assert figures(tenant_budget) == (0, ANSWER_NANO)
    assert (request.request_id, 2) in unpublished
    execute.realtime_execute(request.request_id, 2)
    assert figures(tenant_budget) == (ANSWER_NANO, 0)


# --- concurrency and the arithmetic against a model ----------------------------------


@pytest.fixture
def store() -> Iterator[BudgetStore]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    prefix = f"bp{uuid.uuid4().hex[:8]}"
    yield BudgetStore(client, prefix=prefix)
    keys = client.keys(f"{prefix}:*")
    if keys:
        client.delete(*keys)
    client.close()


def test_threads_racing_for_one_budget_never_reserve_past_it(store: BudgetStore) -> None:
    store._client.hset(budget.definitions_key(store.prefix, "t"), mapping={"loaded": "1", "tenant": budget.definition(1, 1000, Period.TOTAL, Scope.TENANT)})
    granted: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def race(n: int) -> None:
        barrier.wait()
        for i in range(10):
            key = f"{store.prefix}:req:{n}-{i}"
            if store.reserve(tenant_id="t", record_key=key, api_key_id=None, session_id="s", amount=7, now=0).budgets:
                with lock:
                    granted.append(7)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == 994  # 142 reservations of 7: the most that fit in 1000, and no more
    assert store.spend(1, Period.TOTAL, 0) == (0, 994)


@dataclass
class Model:
    """What the budgets should hold, request by request."""

    limit: int
    spent: int = 0
    held: dict[str, int] = field(default_factory=dict)

    @property
    def used(self) -> int:
        return self.spent + sum(self.held.values())


operations = st.lists(
    st.tuples(st.sampled_from(["reserve", "correct", "settle", "release"]), st.integers(0, 5), st.integers(0, 400)),
    min_size=1,
    max_size=40,
)


@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=operations)
def test_any_sequence_of_steps_matches_the_model_and_never_passes_the_limit(store: BudgetStore, steps: list[tuple[str, int, int]]) -> None:
    prefix = f"{store.prefix}:{uuid.uuid4().hex[:6]}"
    budgets_store = BudgetStore(store._client, prefix=prefix)
    store._client.hset(budget.definitions_key(prefix, "t"), mapping={"loaded": "1", "tenant": budget.definition(9, 1000, Period.TOTAL, Scope.TENANT)})
    model = Model(limit=1000)
    for action, n, amount in steps:
        key, name = f"{prefix}:req:{n}", str(n)
        if action == "reserve" and name not in model.held:
            reserved = budgets_store.reserve(tenant_id="t", record_key=key, api_key_id=None, session_id="s", amount=amount, now=0)
            fits = model.used + amount <= model.limit
            assert (reserved.budgets == 1) == fits and (reserved.over is None) == fits
            if fits:
                model.held[name] = amount
        elif action == "correct":
            over = budgets_store.correct(key, amount)
            fits = name not in model.held or model.used - model.held[name] + amount <= model.limit
            assert (over is None) == fits
            if fits and name in model.held:
                model.held[name] = amount
        elif action == "settle":
            charge = min(amount, model.held.get(name, 0))  # an answer costs at most what it reserved
            assert budgets_store.settle(key, charge) == model.held.pop(name, 0)
            model.spent += charge if charge else 0
        elif action == "release":
            assert budgets_store.release(key) == 0  # nothing streamed: refunded
            model.held.pop(name, None)
        assert budgets_store.spend(9, Period.TOTAL, 0) in (None, (model.spent, model.used - model.spent))
        assert model.used <= model.limit


def test_a_day_budget_used_up_today_is_whole_again_tomorrow_through_the_start(
    owner: TenantFixture, unpublished: list[tuple[str, int]], fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start script charges the period the gateway names: the next UTC day's key is
    a new one, so the budget is whole again, and yesterday's spend stays where it was."""
    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("0.008"), period="day")
    request = request_of(owner, "today")
    start_request(request)
    execute.realtime_execute(request.request_id, 1)
    with pytest.raises(BudgetExceeded) as refused:
        start_request(request_of(owner, "today, once more"))
    assert refused.value.data["remaining_usd"] == "0"
    today, month = budget.period_ids(time.time())
    monkeypatch.setattr(budget, "period_ids", lambda now: ("d2999-01-01", month))  # the gateway's clock, tomorrow
    tomorrow = request_of(owner, "tomorrow")
    assert start_request(tomorrow).kind is start.StartKind.SUBMITTED
    client, prefix = get_bus().redis.client, get_bus().prefix
    assert client.hget(budget.spend_key(prefix, item.id, "d2999-01-01"), "reserved") == str(ANSWER_NANO)
    assert client.hget(budget.spend_key(prefix, item.id, today), "spent") == str(ANSWER_NANO)
