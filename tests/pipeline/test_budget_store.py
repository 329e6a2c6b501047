"""The budgets' arithmetic in Redis (``resilience.budget``), on the real Redis: periods,
prices, reservations that are all or none, corrections, settlements, releases."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings
from hypothesis import given
from hypothesis import strategies as st

from pipeline.resilience import budget
from pipeline.resilience.budget import BudgetStore, Over, Period, Scope

DAY1 = dt.datetime(2026, 12, 31, 23, 59, tzinfo=dt.UTC).timestamp()
DAY2 = dt.datetime(2027, 1, 1, 0, 1, tzinfo=dt.UTC).timestamp()
TENANT = "tenant-a"


@pytest.fixture
def store() -> Iterator[BudgetStore]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    prefix = f"bt{uuid.uuid4().hex[:8]}"
    yield BudgetStore(client, prefix=prefix)
    keys = client.keys(f"{prefix}:*")
    if keys:
        client.delete(*keys)
    client.close()


def define(store: BudgetStore, **fields: str) -> None:
    """The tenant's definitions, as ``services.budgets`` publishes them."""
    store._client.hset(budget.definitions_key(store.prefix, TENANT), mapping={"loaded": "1", **fields})


def record(store: BudgetStore, request_id: str, **fields: str) -> str:
    key = f"{store.prefix}:req:{request_id}"
    store._client.hset(key, mapping={"status": "queued", **fields})
    return key


def reserve(store: BudgetStore, request_id: str, amount: int, *, key_id: int | None = 7, session: str = "s1", now: float = DAY1) -> budget.Reserved:
    return store.reserve(tenant_id=TENANT, record_key=record(store, request_id), api_key_id=key_id, session_id=session, amount=amount, now=now)


def figures(store: BudgetStore, budget_id: int, period: Period = Period.TOTAL, now: float = DAY1) -> tuple[int, int] | None:
    return store.spend(budget_id, period, now)


def test_periods_are_utc_days_and_months_and_a_month_ends_at_the_next_one() -> None:
    assert budget.period_ids(DAY1) == ("d2026-12-31", "m2026-12")
    assert budget.period_ids(DAY2) == ("d2027-01-01", "m2027-01")
    assert budget.period_start(Period.DAY, DAY1) == dt.datetime(2026, 12, 31, tzinfo=dt.UTC)
    assert budget.period_start(Period.MONTH, DAY1) == dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    assert budget.resets_at(Period.DAY, DAY1) == dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    assert budget.resets_at(Period.MONTH, DAY1) == dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    assert budget.resets_at(Period.MONTH, dt.datetime(2027, 1, 31, tzinfo=dt.UTC).timestamp()) == dt.datetime(2027, 2, 1, tzinfo=dt.UTC)
    assert budget.period_start(Period.TOTAL, DAY1) is None and budget.resets_at(Period.TOTAL, DAY1) is None


def test_a_price_per_million_tokens_is_a_thousand_nano_usd_per_token_per_dollar() -> None:
    assert budget.nano_cost(1_000_000, 0, price_input_per_mtok=2.5, price_output_per_mtok=99) == 2_500_000_000  # 2.5 USD
    assert budget.nano_cost(3, 8, price_input_per_mtok=0.15, price_output_per_mtok=1000) == 450 + 8_000_000


def test_with_the_definitions_unknown_nothing_is_reserved(store: BudgetStore) -> None:
    assert reserve(store, "r1", 10) == budget.Reserved(known=False)
    assert store._client.hget(f"{store.prefix}:req:r1", "reserved") is None


def test_with_no_budget_that_applies_the_reservation_holds_nothing(store: BudgetStore) -> None:
    define(store, **{"key:99": budget.definition(5, 1, Period.TOTAL, Scope.KEY), "session:other": budget.definition(6, 1, Period.TOTAL, Scope.SESSION)})
    assert reserve(store, "r1", 10) == budget.Reserved(budgets=0)
    assert store._client.hget(f"{store.prefix}:req:r1", "budget_keys") is None
    assert figures(store, 5) is None and figures(store, 6) is None


def test_every_budget_that_applies_is_charged_or_none_is(store: BudgetStore) -> None:
    define(
        store,
        tenant=budget.definition(1, 1000, Period.MONTH, Scope.TENANT),
        **{"key:7": budget.definition(2, 100, Period.DAY, Scope.KEY), "session:s1": budget.definition(3, 500, Period.TOTAL, Scope.SESSION)},
    )
    assert reserve(store, "r1", 60) == budget.Reserved(budgets=3)
    assert figures(store, 1, Period.MONTH) == (0, 60) and figures(store, 2, Period.DAY) == (0, 60) and figures(store, 3) == (0, 60)
    # 60 + 41 is over the key's 100 only: refused, and no budget charged.
    refused = reserve(store, "r2", 41)
    assert refused.over == Over(budget_id=2, scope=Scope.KEY, remaining_nano=40, period=Period.DAY, limit_nano=100)
    assert figures(store, 1, Period.MONTH) == (0, 60) and figures(store, 3) == (0, 60)
    assert store._client.hget(f"{store.prefix}:req:r2", "reserved") is None
    # Exactly what is left fits.
    assert reserve(store, "r3", 40).budgets == 3
    assert figures(store, 2, Period.DAY) == (0, 100)
    assert reserve(store, "r4", 1).over is not None


def test_a_settlement_moves_the_reservation_to_the_spend_once(store: BudgetStore) -> None:
    define(store, tenant=budget.definition(1, 1000, Period.TOTAL, Scope.TENANT))
    reserve(store, "r1", 300)
    key = f"{store.prefix}:req:r1"
    assert store.settle(key, 120) == 300
    assert figures(store, 1) == (120, 0)
    assert store.settle(key, 120) == 0  # a second settle of the same request changes nothing
    assert figures(store, 1) == (120, 0)
    # What the settlement freed is free: 880 left.
    assert reserve(store, "r2", 880).budgets == 1
    assert reserve(store, "r3", 1).over == Over(1, Scope.TENANT, 0, Period.TOTAL, 1000)


def test_a_correction_up_is_refused_when_it_does_not_fit_and_the_reservation_stays(store: BudgetStore) -> None:
    define(store, tenant=budget.definition(1, 1000, Period.TOTAL, Scope.TENANT), **{"session:s1": budget.definition(3, 400, Period.TOTAL, Scope.SESSION)})
    reserve(store, "other", 100, session="s2")  # the tenant's only
    reserve(store, "r1", 200)
    key = f"{store.prefix}:req:r1"
    assert store.correct(key, 350) is None
    assert figures(store, 1) == (0, 450) and figures(store, 3) == (0, 350)
    over = store.correct(key, 401)
    assert over == Over(3, Scope.SESSION, 400, Period.TOTAL, 400)  # what the other requests leave it: all of it
    assert figures(store, 1) == (0, 450) and figures(store, 3) == (0, 350)
    assert store.correct(key, 10) is None  # down is always allowed
    assert figures(store, 1) == (0, 110) and store._client.hget(key, "reserved") == b"10"
    assert store.correct(f"{store.prefix}:req:unbudgeted", 10**12) is None  # no reservation, nothing to correct


def test_a_failure_before_a_token_is_refunded_and_after_one_charged_in_full(store: BudgetStore) -> None:
    define(store, tenant=budget.definition(1, 1000, Period.TOTAL, Scope.TENANT))
    reserve(store, "early", 300)
    assert store.release(f"{store.prefix}:req:early") == 0
    assert figures(store, 1) == (0, 0)
    reserve(store, "late", 300)
    store._client.hset(f"{store.prefix}:req:late", "streamed", "1")
    assert store.release(f"{store.prefix}:req:late") == 300
    assert figures(store, 1) == (300, 0)
    assert store.release(f"{store.prefix}:req:late") == 0  # released once


def test_a_new_period_starts_from_nothing(store: BudgetStore) -> None:
    define(store, tenant=budget.definition(1, 100, Period.DAY, Scope.TENANT))
    reserve(store, "r1", 100, now=DAY1)
    store.settle(f"{store.prefix}:req:r1", 100)
    assert reserve(store, "r2", 1, now=DAY1).over == Over(1, Scope.TENANT, 0, Period.DAY, 100)
    assert reserve(store, "r3", 100, now=DAY2).budgets == 1  # two minutes later, a new day
    assert figures(store, 1, Period.DAY, DAY1) == (100, 0) and figures(store, 1, Period.DAY, DAY2) == (0, 100)
    ttl = store._client.ttl(budget.spend_key(store.prefix, 1, "d2027-01-01"))
    assert 0 < ttl <= 2 * 86_400  # a day's figures outlive it a little, then go


def test_a_months_figures_expire_and_a_totals_do_not(store: BudgetStore) -> None:
    define(store, tenant=budget.definition(1, 100, Period.MONTH, Scope.TENANT), **{"key:7": budget.definition(2, 100, Period.TOTAL, Scope.KEY)})
    reserve(store, "r1", 5)
    assert 86_400 * 39 < store._client.ttl(budget.spend_key(store.prefix, 1, "m2026-12")) <= 86_400 * 40
    assert store._client.ttl(budget.spend_key(store.prefix, 2, "total")) == -1


def test_writing_the_definitions_replaces_them_and_a_rebuild_only_fills_what_is_missing(store: BudgetStore) -> None:
    script = store._client.register_script(budget.WRITE_DEFINITIONS_SCRIPT)
    defs = budget.definitions_key(store.prefix, TENANT)
    spend = budget.spend_key(store.prefix, 1, "total")
    assert script(keys=[defs, spend], args=["publish", 1, "tenant", budget.definition(1, 100, Period.TOTAL, Scope.TENANT), 30]) == 1
    assert store._client.hgetall(defs) == {b"loaded": b"1", b"tenant": b"1|100|total|tenant"}
    assert figures(store, 1) == (30, 0)
    # A spend key that exists keeps its running figure; a rebuild of known definitions does nothing.
    assert script(keys=[defs, spend], args=["publish", 1, "tenant", budget.definition(1, 200, Period.TOTAL, Scope.TENANT), 99]) == 1
    assert figures(store, 1) == (30, 0) and store._client.hget(defs, "tenant") == b"1|200|total|tenant"
    assert script(keys=[defs, spend], args=["rebuild", 0, 0]) == 0
    assert store._client.hget(defs, "tenant") == b"1|200|total|tenant"
    # Without budgets, the definitions still say they were loaded: no budget applies.
    store._client.delete(defs)
    assert script(keys=[defs], args=["rebuild", 0]) == 1
    assert store._client.hgetall(defs) == {b"loaded": b"1"}


def test_a_spend_key_lost_mid_request_never_comes_back_owing(store: BudgetStore) -> None:
    """Under an eviction policy a spend key can go while a request holds a reservation
    on it: neither the correction nor the settlement may leave it a negative
    reservation, which would let later requests past the limit."""
    define(store, tenant=budget.definition(1, 100, Period.TOTAL, Scope.TENANT))
    reserve(store, "r1", 60)
    spend = budget.spend_key(store.prefix, 1, "total")
    store._client.delete(spend)
    assert store.correct(f"{store.prefix}:req:r1", 80) is None  # nothing to check against: allowed
    assert figures(store, 1) == (0, 80)
    store._client.delete(spend)
    assert store.settle(f"{store.prefix}:req:r1", 50) == 80
    assert figures(store, 1) == (50, 0)
    assert reserve(store, "r2", 51).over == Over(1, Scope.TENANT, 50, Period.TOTAL, 100)
    reserve(store, "r3", 50)
    store._client.delete(spend)
    assert store.release(f"{store.prefix}:req:r3") == 0
    assert figures(store, 1) is None  # nothing written back: the refund owed nothing


@given(at=st.integers(min_value=0, max_value=4_102_444_800), period=st.sampled_from([Period.DAY, Period.MONTH]))
def test_every_instant_lies_in_one_period_that_ends_where_the_next_begins(at: int, period: Period) -> None:
    start, end = budget.period_start(period, at), budget.resets_at(period, at)
    assert start is not None and end is not None
    assert start.timestamp() <= at < end.timestamp()
    index = 0 if period is Period.DAY else 1
    assert budget.period_ids(start.timestamp())[index] == budget.period_ids(at)[index] != budget.period_ids(end.timestamp())[index]
    assert budget.period_start(period, end.timestamp()) == end  # the next period begins exactly at the reset


@given(
    tokens=st.tuples(st.integers(0, 10**7), st.integers(0, 10**7), st.integers(0, 10**7)),
    prices=st.tuples(st.floats(0, 1000, allow_nan=False), st.floats(0, 1000, allow_nan=False)),
)
def test_a_cost_grows_with_its_tokens_and_is_never_negative(tokens: tuple[int, int, int], prices: tuple[float, float]) -> None:
    prompt, answer, more = tokens
    cost = budget.nano_cost(prompt, answer, price_input_per_mtok=prices[0], price_output_per_mtok=prices[1])
    assert cost >= 0
    assert budget.nano_cost(prompt + more, answer, price_input_per_mtok=prices[0], price_output_per_mtok=prices[1]) >= cost
    assert budget.nano_cost(prompt, answer + more, price_input_per_mtok=prices[0], price_output_per_mtok=prices[1]) >= cost


def test_replies_are_read_whether_redis_decodes_them_or_not() -> None:
    assert Over.from_reply([b"over", b"3", b"session", 5, b"day", 9]) == Over.from_reply(["over", "3", "session", 5, "day", 9])
    assert Over.from_reply(["over", "3", "session", 5, "day", 9]) == Over(3, Scope.SESSION, 5, Period.DAY, 9)
    assert budget.Reserved.from_reply([b"unknown"]) == budget.Reserved(known=False)
    assert budget.Reserved.from_reply(["ok", 2]) == budget.Reserved(budgets=2)
    assert budget.Reserved.from_reply([b"over", b"1", b"tenant", 0, b"total", 1]).over == Over(1, Scope.TENANT, 0, Period.TOTAL, 1)


def test_definitions_name_their_budget_limit_period_and_scope() -> None:
    assert budget.definition(12, 500, Period.MONTH, Scope.KEY) == "12|500|month|key"
    assert budget.definitions_key("p", "t-1") == "p:budgets:t-1"
    assert budget.spend_key("p", 12, "m2026-12") == "p:budget:12:m2026-12"


def test_a_provider_that_counted_more_than_was_reserved_is_charged_what_it_counted(store: BudgetStore) -> None:
    """The spend is the truth, whatever the bound said: a provider whose tokenizer made
    more tokens than the prompt's bytes (none known does) shows as spend past the
    reservation, and the next request is refused accordingly."""
    define(store, tenant=budget.definition(1, 100, Period.TOTAL, Scope.TENANT))
    reserve(store, "r1", 30)
    assert store.settle(f"{store.prefix}:req:r1", 45) == 30
    assert figures(store, 1) == (45, 0)
    assert reserve(store, "r2", 56).over == Over(1, Scope.TENANT, 55, Period.TOTAL, 100)
