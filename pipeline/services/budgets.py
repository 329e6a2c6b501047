"""Budgets on tenants, API keys and sessions, and the usage ledger.

A budget's definition lives in Postgres and is copied to Redis (``publish``, after
every change is committed), where the request's start script reserves against it
(``resilience.budget``): the request's worst case at the gateway, corrected by the
worker once the prompt is assembled (``correct``), settled with the answer's real
usage (``settle``), or refunded when the request fails before a token (``release``).

The ledger (``UsageEntry``) records every answer's cost, so reports and a Redis that
lost its data (``rebuild``) do not depend on Redis.

What a request may cost is bounded in tokens without a tokenizer (``pipeline.bounds``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import structlog
from django.db import DatabaseError, transaction
from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncDay

from orchestrator_site.errors import BudgetExceeded, InvalidRequest, NotFound, ServiceUnavailable
from pipeline import metrics
from pipeline.bounds import assembled_prompt_bound, message_token_bound
from pipeline.config import PipelineSettings
from pipeline.models import ApiKey, Budget, BudgetPeriod, BudgetScope, Tenant, UsageEntry, UsageOutcome
from pipeline.resilience import budget
from pipeline.resilience.budget import NANO_PER_USD, Over, Period, Scope
from pipeline.routing import worker_config
from pipeline.shared_redis import SharedRedis, get_redis, redis_errors
from pipeline.tokenbus import get_bus
from pipeline.types import ChatMessage, Leg, PipelineResult, PromptRequest, Usage
from workers.types import AssembledPrompt

log = structlog.get_logger("pipeline.services")


@contextlib.contextmanager
def postgres_errors(action: str) -> Iterator[None]:
    """A Postgres failure inside, as ``ServiceUnavailable`` naming ``action``."""
    try:
        yield
    except DatabaseError as exc:
        raise ServiceUnavailable(f"postgres unavailable while trying to {action}", data={"service": "postgres"}, retry_after=5.0) from exc


def usd(nano: int) -> Decimal:
    return Decimal(nano) / NANO_PER_USD


def limit_nano(amount_usd: Decimal) -> int:
    return int(amount_usd * NANO_PER_USD)


# --- what a request may cost -----------------------------------------------------


def gateway_prompt_bound(request: PromptRequest, config: PipelineSettings) -> int:
    """The prompt tokens the gateway can see: the prompt, the client's conversation, its
    tools and options, and the RAG context at its configured most. The session's stored
    turns it cannot see; the worker's correction adds them."""
    seen = message_token_bound((*request.history, ChatMessage("user", request.prompt), *request.tool_turns))
    options = len(json.dumps(request.options.to_dict(), ensure_ascii=False).encode()) if request.options.to_dict() else 0
    context = 4 * config.rag.max_context_chars if request.tenant_has_documents else 0  # 4: UTF-8's widest character
    return seen + options + context


def worst_case_nano(request: PromptRequest, config: PipelineSettings, prompt_tokens: int) -> int:
    worker = worker_config(config, request.worker)
    return budget.nano_cost(
        prompt_tokens, request.max_tokens, price_input_per_mtok=worker.price_input_per_mtok, price_output_per_mtok=worker.price_output_per_mtok
    )


def usage_nano(config: PipelineSettings, worker: str, usage: Usage) -> int:
    prices = worker_config(config, worker)
    return budget.nano_cost(
        usage.prompt_tokens, usage.completion_tokens, price_input_per_mtok=prices.price_input_per_mtok, price_output_per_mtok=prices.price_output_per_mtok
    )


def legs_nano(config: PipelineSettings, legs: Iterable[Leg]) -> int:
    """What providers' parts of an answer cost, each at its own worker's prices."""
    return sum(usage_nano(config, leg.worker, leg.usage) for leg in legs)


def actual_nano(result: PipelineResult, config: PipelineSettings) -> int:
    """What an answer cost: each provider's part at its own prices, when it failed over."""
    if result.legs:
        return legs_nano(config, result.legs)
    return usage_nano(config, result.worker, result.usage)


def exceeded(over: Over, *, now: float | None = None) -> BudgetExceeded:
    """402 ``budget_exceeded``, naming the budget, what it has left and when it resets."""
    resets = budget.resets_at(over.period, time.time() if now is None else now)
    remaining = usd(over.remaining_nano)
    return BudgetExceeded(
        f"the {over.scope.value} budget {over.budget_id} ({usd(over.limit_nano)} USD {over.period.value}) has {remaining} USD left,"
        " less than this request may cost",
        data={
            "budget_id": over.budget_id,
            "scope": over.scope.value,
            "period": over.period.value,
            "limit_usd": str(usd(over.limit_nano)),
            "remaining_usd": str(remaining),
            "resets_at": resets.isoformat() if resets else None,
        },
    )


# --- definitions: Postgres to Redis ------------------------------------------------


def _field(item: Budget) -> str:
    if item.scope == BudgetScope.KEY:
        return f"key:{item.api_key_id}"
    if item.scope == BudgetScope.SESSION:
        return f"session:{item.session_id}"
    return "tenant"


def _spent_this_period(item: Budget, now: float) -> int:
    entries = UsageEntry.objects.filter(tenant_id=item.tenant_id)
    if item.scope == BudgetScope.KEY:
        entries = entries.filter(api_key_id=item.api_key_id)
    elif item.scope == BudgetScope.SESSION:
        entries = entries.filter(session_id=item.session_id)
    start = budget.period_start(Period(item.period), now)
    if start is not None:
        entries = entries.filter(created_at__gte=start)
    total = entries.aggregate(total=Sum("cost_usd"))["total"]
    return int((total or Decimal(0)) * NANO_PER_USD)


def _write_definitions(tenant_id: str, mode: str, *, now: float | None = None) -> bool:
    """The tenant's definitions into Redis (``mode``: see ``budget.WRITE_DEFINITIONS_SCRIPT``)."""
    now = time.time() if now is None else now
    day_id, month_id = budget.period_ids(now)
    shared = get_redis()
    fields: list[str] = []
    keys = [budget.definitions_key(shared.prefix, tenant_id)]
    spent: list[int] = []
    with postgres_errors("read the budgets"):
        items = list(Budget.objects.filter(tenant_id=tenant_id)) if _is_tenant_id(tenant_id) else []
        for item in items:
            period = Period(item.period)
            fields += [_field(item), budget.definition(item.id, limit_nano(item.amount_usd), period, Scope(item.scope))]
            keys.append(budget.spend_key(shared.prefix, item.id, {Period.DAY: day_id, Period.MONTH: month_id}.get(period, "total")))
            spent.append(_spent_this_period(item, now))
    with redis_errors("write the budgets"):
        return bool(shared.client.eval(budget.WRITE_DEFINITIONS_SCRIPT, len(keys), *keys, mode, len(items), *fields, *spent))


def publish(tenant_id: str) -> None:
    """The tenant's budgets as they are now in Postgres, into Redis: the next request
    reserves against them. Redis down: logged; the next start after it is back finds
    the definitions as they were, or (Redis lost them) rebuilds them."""
    try:
        _write_definitions(tenant_id, "publish")
    except ServiceUnavailable as exc:
        log.warning("budgets_unpublished", tenant_id=tenant_id, outcome="degraded", error_type=type(exc.__cause__ or exc).__name__)


def rebuild(tenant_id: str, *, now: float | None = None) -> bool:
    """The tenant's definitions and this period's spend from Postgres and the ledger,
    into a Redis that does not have them. False: another process did it first."""
    return _write_definitions(tenant_id, "rebuild", now=now)


def budget_changed(instance: Budget, **_: Any) -> None:
    """A budget's ``post_save``/``post_delete``: its tenant's budgets are published
    once the transaction commits."""
    tenant_id = str(instance.tenant_id)
    transaction.on_commit(lambda: publish(tenant_id))


def apply_anywhere(tenant_id: str, api_key_id: int | None, session_id: str) -> bool:
    """Whether any budget applies to a request: asked of Postgres while Redis is down,
    where a request under a budget is refused rather than run uncounted."""
    if not _is_tenant_id(tenant_id):
        return False
    where = Q(scope=BudgetScope.TENANT) | Q(scope=BudgetScope.SESSION, session_id=session_id)
    if api_key_id is not None:
        where |= Q(scope=BudgetScope.KEY, api_key_id=api_key_id)
    with postgres_errors("read the budgets"):
        return Budget.objects.filter(where, tenant_id=tenant_id).exists()


# --- the worker's side --------------------------------------------------------------


# One store per shared Redis: its scripts registered once, not on every settle.
_stores: weakref.WeakKeyDictionary[SharedRedis, budget.BudgetStore] = weakref.WeakKeyDictionary()


def store() -> budget.BudgetStore:
    shared = get_redis()
    found = _stores.get(shared)
    if found is None:
        found = _stores[shared] = budget.BudgetStore(shared.client, prefix=shared.prefix)
    return found


def correct(request: PromptRequest, prompt: AssembledPrompt, config: PipelineSettings, *, record_key: str) -> None:
    """The reservation, corrected to the assembled prompt plus ``max_tokens`` before
    the provider is called; ``BudgetExceeded`` when that does not fit."""
    over = store().correct(record_key, worst_case_nano(request, config, assembled_prompt_bound(prompt)))
    if over is not None:
        raise exceeded(over)


def count_spend(tenant_id: str, result: PipelineResult, config: PipelineSettings) -> None:
    """An answer's tokens and cost into the metrics: each provider's part, at its own
    prices, when it failed over."""
    for leg in result.legs or (Leg(result.worker, result.model, result.usage),):
        cost = usd(usage_nano(config, leg.worker, leg.usage))
        metrics.tokens_used(tenant_id, leg.worker, leg.usage, model=leg.model, cost_usd=float(cost))


def cover_failover(record_key: str, config: PipelineSettings, legs: tuple[Leg, ...], *, worker: str, prompt: AssembledPrompt) -> bool:
    """The reservation, corrected to what ``legs`` cost plus the worst case of
    ``prompt`` on ``worker``: False (and unchanged) when that does not fit."""
    spent = legs_nano(config, legs)
    prices = worker_config(config, worker)
    next_worst = budget.nano_cost(
        assembled_prompt_bound(prompt), prompt.max_tokens, price_input_per_mtok=prices.price_input_per_mtok, price_output_per_mtok=prices.price_output_per_mtok
    )
    try:
        return store().correct(record_key, spent + next_worst) is None
    except ServiceUnavailable as exc:
        log.warning("budget_uncorrected", record_key=record_key, outcome="degraded", error_type=type(exc.__cause__ or exc).__name__)
        return False  # fail closed: the provider's error stands


def queue_settle(pipe: Any, record_key: str, charge_nano: int) -> None:
    """``settle`` as a command of ``pipe`` (the run's bookkeeping pipeline)."""
    store().queue_settle(pipe, record_key, charge_nano)


def release(request_id: str) -> int:
    """A failed request's reservation: refunded, or charged in full when tokens had
    reached its stream (then written to the ledger). What was charged (nano-USD).
    Redis down: logged, and the reservation stays (never less than the cost) until its
    period's key expires."""
    bus = get_bus()
    record_key = bus.record_key(request_id)
    try:
        charged = store().release(record_key)
        with redis_errors("read the request"):
            payload = bus.redis.client.hget(record_key, "payload") if charged else None
    except ServiceUnavailable as exc:
        log.warning("budget_unreleased", request_id=request_id, outcome="degraded", error_type=type(exc.__cause__ or exc).__name__)
        return 0
    if payload:
        request = PromptRequest.from_dict(json.loads(payload))
        ledger_write_safely(
            request, worker=request.worker, model=request.model, prompt_tokens=0, completion_tokens=0, cost_nano=charged, outcome=UsageOutcome.FAILED
        )
    return charged


HOLD_TTL_S = 3600  # a batch item's reservation outlives any run of it


def hold_key(request_id: str) -> str:
    """Where a request that has no record on the token bus (a batch item) keeps its
    reservation."""
    return get_redis().key("budget", "hold", request_id)


def hold(request: PromptRequest, config: PipelineSettings, prompt: AssembledPrompt) -> str | None:
    """A batch item's reservation, made in the worker once its prompt is assembled (no
    gateway stands before it): the assembled prompt plus ``max_tokens``, against every
    budget that applies, all or none. The hold's key, or None when no budget applies.
    ``BudgetExceeded`` when one cannot cover it; ``ServiceUnavailable`` when Redis is
    down and a budget applies (fail closed)."""
    record_key = hold_key(request.request_id)
    amount = worst_case_nano(request, config, assembled_prompt_bound(prompt))
    budgets_store = store()

    def reserve() -> budget.Reserved:
        return budgets_store.reserve(
            tenant_id=request.tenant_id, record_key=record_key, api_key_id=request.api_key_id, session_id=request.session_id, amount=amount, now=time.time()
        )

    try:
        reserved = reserve()
        if not reserved.known:
            rebuild(request.tenant_id)
            reserved = reserve()
        if reserved.budgets:
            with redis_errors("keep the budget reservation"):
                get_redis().client.expire(record_key, HOLD_TTL_S)
    except ServiceUnavailable as exc:
        if exc.data.get("service") == "redis" and not apply_anywhere(request.tenant_id, request.api_key_id, request.session_id):
            return None  # no budget applies: the item runs, uncounted, as every item does while Redis is down
        raise
    if not reserved.known:
        raise ServiceUnavailable("the budgets could not be loaded; retry shortly", data={"service": "redis"}, retry_after=1.0)
    if reserved.over is not None:
        raise exceeded(reserved.over)
    return record_key if reserved.budgets else None


def settle_hold(record_key: str, charge_nano: int) -> None:
    """A held item answered: its reservation becomes ``charge_nano`` of spend. Redis
    down: logged (the reservation stays until its period's key expires)."""
    try:
        store().settle(record_key, charge_nano)
    except ServiceUnavailable as exc:
        log.warning("budget_unsettled", record_key=record_key, outcome="degraded", error_type=type(exc.__cause__ or exc).__name__)


def release_hold(record_key: str) -> None:
    """A held item failed: its reservation refunded (nothing streamed: nothing charged)."""
    try:
        store().release(record_key)
    except ServiceUnavailable as exc:
        log.warning("budget_unreleased", record_key=record_key, outcome="degraded", error_type=type(exc.__cause__ or exc).__name__)


def ledger_row(result: PipelineResult, *, cost_nano: int) -> dict[str, object]:
    """An answer's row of the ledger, as ``sessions.session_turns_append`` writes it
    with the session's turns."""
    usage = result.usage
    return {
        "worker": result.worker,
        "model": result.model,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cost_usd": usd(cost_nano),
        "outcome": UsageOutcome.ANSWERED.value,
    }


def _usage_entry(
    request: PromptRequest, *, worker: str, model: str, prompt_tokens: int, completion_tokens: int, cost_nano: int, outcome: UsageOutcome
) -> UsageEntry:
    return UsageEntry(
        tenant_id=request.tenant_id,
        api_key_id=request.api_key_id,
        session_id=request.session_id,
        request_id=request.request_id,
        worker=worker,
        model=model,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cost_usd=usd(cost_nano),
        outcome=outcome,
        created_at=dt.datetime.now(tz=dt.UTC),
    )


def ledger_write(request: PromptRequest, *, worker: str, model: str, prompt_tokens: int, completion_tokens: int, cost_nano: int, outcome: UsageOutcome) -> None:
    """One row of the ledger; a request already in it is not written twice."""
    entry = _usage_entry(
        request, worker=worker, model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost_nano=cost_nano, outcome=outcome
    )
    UsageEntry.objects.bulk_create([entry], ignore_conflicts=True)


def ledger_write_safely(request: PromptRequest, **entry: Any) -> None:
    """``ledger_write``; Postgres refusing is logged (the answer stands, and Redis's
    spend has it: the ledger lacks one row)."""
    try:
        ledger_write(request, **entry)
    except DatabaseError as exc:
        log.warning("usage_unrecorded", request_id=request.request_id, outcome="error", error_type=type(exc).__name__)


def ledger_write_answers_safely(answers: Sequence[tuple[PromptRequest, PipelineResult]], config: PipelineSettings) -> None:
    """The ledger rows of several answers (a batch group's) in one INSERT; a request
    already in it is not written twice, and Postgres refusing is logged, as above."""
    entries = [
        _usage_entry(
            request,
            worker=result.worker,
            model=result.model,
            prompt_tokens=result.usage.prompt_tokens,
            completion_tokens=result.usage.completion_tokens,
            cost_nano=actual_nano(result, config),
            outcome=UsageOutcome.ANSWERED,
        )
        for request, result in answers
    ]
    try:
        UsageEntry.objects.bulk_create(entries, ignore_conflicts=True)
    except DatabaseError as exc:
        log.warning("usage_unrecorded", request_id=entries[0].request_id if entries else "", rows=len(entries), outcome="error", error_type=type(exc).__name__)


# --- operators and reports ------------------------------------------------------------


@dataclass(frozen=True)
class Standing:
    """A budget and where it stands in its current period."""

    item: Budget
    spent_nano: int
    reserved_nano: int
    resets_at: dt.datetime | None

    @property
    def remaining_nano(self) -> int:
        return max(limit_nano(self.item.amount_usd) - self.spent_nano - self.reserved_nano, 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.item.id,
            "scope": self.item.scope,
            "api_key_prefix": self.item.api_key.prefix if self.item.api_key_id and self.item.api_key else None,
            "session_id": self.item.session_id or None,
            "period": self.item.period,
            "amount_usd": str(self.item.amount_usd),
            "spent_usd": str(usd(self.spent_nano)),
            "reserved_usd": str(usd(self.reserved_nano)),
            "remaining_usd": str(usd(self.remaining_nano)),
            "resets_at": self.resets_at.isoformat() if self.resets_at else None,
        }


def standings(items: Iterable[Budget], *, now: float | None = None) -> list[Standing]:
    """Each budget's spend in its current period: Redis's running figures (one round
    trip for all), or the ledger's where Redis has none (down, or not yet asked;
    nothing reserved then)."""
    now = time.time() if now is None else now
    items = list(items)
    try:
        running = store().spends([(item.id, Period(item.period)) for item in items], now)
    except ServiceUnavailable:
        running = [None] * len(items)
    result = []
    for item, figures in zip(items, running, strict=True):
        spent, reserved = figures if figures is not None else (_spent_this_period(item, now), 0)
        result.append(Standing(item, spent, reserved, budget.resets_at(Period(item.period), now)))
    return result


def remaining_by_tenant(*, labels: int, now: float | None = None) -> dict[tuple[str, str], Decimal]:
    """USD left in every budget, summed by tenant and scope: the ``labels`` tenants
    with the most spent this period by their own id, the others as ``other`` (the
    rule of every tenant label: docs/observability.md)."""
    found = standings(Budget.objects.all(), now=now)
    spent: dict[str, int] = {}
    for standing in found:
        tenant = str(standing.item.tenant_id)
        spent[tenant] = spent.get(tenant, 0) + standing.spent_nano
    top = set(sorted(spent, key=lambda t: (-spent[t], t))[:labels])
    left: dict[tuple[str, str], Decimal] = {}
    for standing in found:
        tenant = str(standing.item.tenant_id)
        key = (tenant if tenant in top else "other", standing.item.scope)
        left[key] = left.get(key, Decimal(0)) + usd(standing.remaining_nano)
    return left


def budget_set(*, amount_usd: Decimal, period: str, tenant: str | None = None, key_prefix: str | None = None, session_id: str | None = None) -> Budget:
    """Create or change the budget on a tenant (by name), an API key (by prefix) or a
    session of a tenant; ``InvalidRequest`` or ``NotFound`` for a bad amount or target."""
    if not amount_usd.is_finite() or amount_usd < 0:
        raise InvalidRequest("a budget is an amount of USD, 0 or more", data={"field": "amount_usd"})
    if period not in BudgetPeriod.values:
        raise InvalidRequest(f"period must be one of {', '.join(BudgetPeriod.values)}", data={"field": "period"})
    with postgres_errors("write the budget"):
        if key_prefix:
            keys = list(ApiKey.objects.filter(prefix=key_prefix, revoked_at__isnull=True).select_related("tenant")[:2])
            if len(keys) != 1:
                raise NotFound(f"no single live API key starts {key_prefix!r}", data={"key_prefix": key_prefix})
            target: dict[str, Any] = {"tenant": keys[0].tenant, "scope": BudgetScope.KEY, "api_key": keys[0]}
        else:
            owner = Tenant.objects.filter(name=tenant).first()
            if owner is None:
                raise NotFound(f"no tenant named {tenant!r}", data={"tenant": tenant})
            target = {"tenant": owner, "scope": BudgetScope.SESSION, "session_id": session_id} if session_id else {"tenant": owner, "scope": BudgetScope.TENANT}
        with transaction.atomic():
            item, _ = Budget.objects.update_or_create(**target, defaults={"amount_usd": amount_usd, "period": period})
        item.refresh_from_db()  # the amount as stored (six places)
    return item


def usage_by_day(tenant_id: str, *, since: dt.datetime, until: dt.datetime) -> list[dict[str, Any]]:
    """The tenant's spend from the ledger, by UTC day, worker and model."""
    rows = (
        UsageEntry.objects.filter(tenant_id=tenant_id, created_at__gte=since, created_at__lt=until)
        .annotate(day=TruncDay("created_at", tzinfo=dt.UTC))
        .values("day", "worker", "model")
        .annotate(requests=Count("id"), prompt_tokens=Sum("prompt_tokens"), completion_tokens=Sum("completion_tokens"), cost_usd=Sum("cost_usd"))
        .order_by("day", "worker", "model")
    )
    return [
        {
            "day": row["day"].date().isoformat(),
            "worker": row["worker"],
            "model": row["model"],
            "requests": row["requests"],
            "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"],
            "cost_usd": str(row["cost_usd"]),
        }
        for row in rows
    ]


def _is_tenant_id(value: str) -> bool:
    """A tenant's id is a UUID; anything else names no tenant, and no budget applies."""
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
