"""Batch items under budgets: each item reserves, corrects and settles as a real-time
request does, so a job cannot spend past a budget; a failed item is refunded; and
while Redis is down an item under a budget waits rather than run uncounted."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from batches.models import BatchJob
from batches.services import Prompt, batch_create, batch_run_chunk
from pipeline.config import get_config
from pipeline.models import Budget, BudgetScope, UsageEntry
from pipeline.services import budgets
from pipeline.shared_redis import get_redis
from tests.conftest import TenantFixture

pytestmark = pytest.mark.django_db


def make_job(owner: TenantFixture, prompts: list[str], **data: Any) -> BatchJob:
    fields = {"prompts": [Prompt(p, f"id-{i}") for i, p in enumerate(prompts)], "worker": "echo_priced", "max_tokens": 8, **data}
    return batch_create(tenant=owner.tenant, data=fields, config=get_config())


def item_outcomes(job: BatchJob) -> list[tuple[str, str | None]]:
    return [(i.status, (i.error or {}).get("code")) for i in job.items.order_by("index")]


def test_a_job_stops_spending_where_the_budget_ends(owner: TenantFixture, fakes: Any) -> None:
    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("0.02"), period="month")
    job = make_job(owner, ["a", "b", "c", "d"])
    batch_run_chunk(job_id=str(job.id), first=0, last=4)
    job.refresh_from_db()
    assert item_outcomes(job) == [("done", None), ("done", None), ("failed", "budget_exceeded"), ("failed", "budget_exceeded")]
    assert (job.status, job.items_done, job.items_failed) == ("completed", 2, 2)
    (now,) = budgets.standings([item])
    assert (budgets.usd(now.spent_nano), now.reserved_nano) == (Decimal("0.016"), 0)
    costs = sorted(UsageEntry.objects.filter(tenant=owner.tenant).values_list("request_id", "cost_usd"))
    assert costs == [(f"{job.id.hex}-0", Decimal("0.008")), (f"{job.id.hex}-1", Decimal("0.008"))]


def test_the_jobs_own_session_may_have_a_budget(owner: TenantFixture, fakes: Any) -> None:
    job = make_job(owner, ["a", "b"])
    Budget.objects.create(tenant=owner.tenant, scope=BudgetScope.SESSION, session_id=f"batch-{job.id.hex}", amount_usd=Decimal("0.01"), period="total")
    batch_run_chunk(job_id=str(job.id), first=0, last=2)
    job.refresh_from_db()
    assert item_outcomes(job) == [("done", None), ("failed", "budget_exceeded")]


def test_an_item_that_fails_is_refunded(owner: TenantFixture, fakes: Any, pipeline_config: Any) -> None:
    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("10"), period="day")
    config = get_config()
    pipeline_config(config.model_copy(update={"batch": config.batch.model_copy(update={"max_attempts": 1})}))
    fakes.openai.mode = "500"
    job = make_job(owner, ["fails"], worker="openai")
    batch_run_chunk(job_id=str(job.id), first=0, last=1)
    job.refresh_from_db()
    assert item_outcomes(job) == [("failed", "worker_unavailable")]
    (now,) = budgets.standings([item])
    assert (now.spent_nano, now.reserved_nano) == (0, 0)
    assert not get_redis().client.exists(budgets.hold_key(f"{job.id.hex}-0"))


def test_a_held_items_reservation_expires_if_its_run_never_ends(owner: TenantFixture) -> None:
    from batches.services import _request_for
    from workers.types import AssembledPrompt, ChatMessage

    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="day")
    job = make_job(owner, ["held"])
    request = _request_for(job, job.items.get(), get_config())
    prompt = AssembledPrompt(messages=(ChatMessage("user", "held"),), model="echo-priced-1", max_tokens=8)
    key = budgets.hold(request, get_config(), prompt)
    assert key == budgets.hold_key(request.request_id)
    assert 0 < get_redis().client.ttl(key) <= budgets.HOLD_TTL_S
    assert get_redis().client.hget(key, "reserved") == str(8 * 1000 * 1000)
    budgets.release_hold(key)
    assert budgets.hold(request.__class__(**{**request.__dict__, "tenant_id": "not-a-tenant"}), get_config(), prompt) is None


def test_with_redis_down_an_item_under_a_budget_waits_and_others_run(owner: TenantFixture, fakes: Any, redis_down: None, queued_chunks: Any) -> None:
    job = make_job(owner, ["runs uncounted"])
    batch_run_chunk(job_id=str(job.id), first=0, last=1)
    job.refresh_from_db()
    assert item_outcomes(job) == [("done", None)]
    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="day")
    waiting = make_job(owner, ["waits"])
    batch_run_chunk(job_id=str(waiting.id), first=0, last=1)
    waiting.refresh_from_db()
    assert item_outcomes(waiting) == [("pending", "service_unavailable")]


def test_with_redis_down_settling_or_releasing_a_hold_is_logged(owner: TenantFixture, redis_down: None) -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        budgets.settle_hold("gone:budget:hold:x", 5)
        budgets.release_hold("gone:budget:hold:x")
    assert [e["event"] for e in logs] == ["budget_unsettled", "budget_unreleased"]


@pytest.fixture
def queued_chunks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """A chunk put back for later is kept here, not sent to a broker."""
    from batches.tasks import run_batch_chunk

    seen: list[tuple[Any, ...]] = []
    monkeypatch.setattr(run_batch_chunk, "apply_async", lambda args, **options: seen.append(args))
    return seen
