"""Deadlines and strict priority, in this process against the real Postgres and
Redis: the urgency order, a running chunk turning to a more urgent job's items
(a higher priority, an earlier deadline, a deadline near), stale entries that stall
nobody, and the items a deadline passed ending ``expired``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from django.utils import timezone
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from batches import services, urgency
from batches.models import BatchItem, BatchJob
from batches.services import Prompt, batch_create, batch_recover, batch_run_chunk
from pipeline.config import get_config
from pipeline.shared_redis import get_redis
from tests.batches.test_batch_services import statuses, with_batch
from tests.conftest import TenantFixture

pytestmark = pytest.mark.django_db

HOUR = dt.timedelta(hours=1)


@pytest.fixture(autouse=True)
def _no_urgency() -> Iterator[None]:
    """Every test starts and ends with no job in the urgency sets."""
    shared = get_redis()
    keys = [shared.key("batch", "urgency"), shared.key("batch", "deadlines")]
    shared.client.delete(*keys)
    yield
    shared.client.delete(*keys)


def job_of(owner: TenantFixture, count: int, *, enter: bool = True, **data: Any) -> BatchJob:
    job = batch_create(tenant=owner.tenant, data={"prompts": [Prompt(f"item {i}", f"c-{i}") for i in range(count)], **data}, config=get_config())
    if enter:
        urgency.enter(job)  # what the commit does (this test's transaction never commits)
    return job


def in_the_sets() -> tuple[list[str], list[str]]:
    shared = get_redis()
    urgent = [str(m) for m in shared.client.zrange(shared.key("batch", "urgency"), 0, -1)]
    due = [str(m) for m in shared.client.zrange(shared.key("batch", "deadlines"), 0, -1)]
    return urgent, due


def test_the_order_is_priority_then_earliest_deadline_then_none() -> None:
    soon, later = timezone.now() + HOUR, timezone.now() + 2 * HOUR
    order = [
        urgency.score("high", soon),
        urgency.score("high", None),
        urgency.score("default", soon),
        urgency.score("default", later),
        urgency.score("default", None),
        urgency.score("low", soon),
        urgency.score("low", None),
    ]
    assert order == sorted(order) and len(set(order)) == len(order)


@given(
    jobs=st.lists(
        st.tuples(st.sampled_from(["high", "default", "low"]), st.none() | st.integers(min_value=0, max_value=10**9)),
        min_size=2,
        max_size=12,
    )
)
def test_the_score_sorts_as_rank_then_deadline_then_none(jobs: list[tuple[str, int | None]]) -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rank = {"high": 1, "default": 2, "low": 3}

    def deadline(seconds: int | None) -> dt.datetime | None:
        return None if seconds is None else start + dt.timedelta(seconds=seconds)

    by_score = sorted(jobs, key=lambda j: (urgency.score(j[0], deadline(j[1])), j))
    by_rule = sorted(jobs, key=lambda j: (rank[j[0]], j[1] is None, j[1] or 0, j))
    assert by_score == by_rule


def test_a_higher_priority_job_is_more_urgent_and_nobody_is_more_urgent_than_itself(owner: TenantFixture, queued: list[Any]) -> None:
    low, high = job_of(owner, 3, priority="low"), job_of(owner, 3, priority="high")
    assert urgency.more_urgent(low, 300) == str(high.pk)
    assert urgency.more_urgent(high, 300) is None


def test_a_job_near_its_deadline_comes_before_a_higher_priority(owner: TenantFixture, queued: list[Any]) -> None:
    high = job_of(owner, 3, priority="high")
    near = job_of(owner, 3, priority="low", deadline=timezone.now() + dt.timedelta(seconds=60))
    far = job_of(owner, 3, priority="low", deadline=timezone.now() + HOUR)
    assert urgency.more_urgent(high, 300) == str(near.pk)  # within deadline_near_s: first of all
    assert urgency.more_urgent(high, 30) is None  # not near with a 30 s window: high goes first
    assert urgency.more_urgent(far, 300) == str(near.pk)
    assert urgency.more_urgent(far, 30) == str(high.pk)  # nobody near: priority decides
    assert urgency.more_urgent(near, 300) is None  # near its deadline: nobody but a nearer one goes first
    assert urgency.is_near(near, 300) and not urgency.is_near(far, 300) and not urgency.is_near(high, 10**6)
    nearer = job_of(owner, 3, priority="low", deadline=timezone.now() + dt.timedelta(seconds=30))
    assert urgency.more_urgent(near, 300) == str(nearer.pk) and urgency.more_urgent(nearer, 300) is None


def test_a_running_chunk_turns_to_the_more_urgent_jobs_items_first(owner: TenantFixture, queued: list[Any]) -> None:
    low = job_of(owner, 4, priority="low")
    high = job_of(owner, 3, priority="high")
    with capture_logs() as logs:
        batch_run_chunk(job_id=str(low.id), first=0, last=3)
    high.refresh_from_db()
    low.refresh_from_db()
    assert statuses(high) == ["done"] * 3 and high.status == "completed"
    assert statuses(low) == ["done"] * 4 and low.status == "completed"
    # The high job's items finished before the low chunk's first.
    high_last = max(high.items.values_list("finished_at", flat=True))
    low_first = min(low.items.values_list("finished_at", flat=True))
    assert high_last < low_first
    assert any(e["event"] == "batch_chunk_preempted" and e["by_job_id"] == str(high.id) for e in logs)
    assert in_the_sets() == ([], [])  # both finished: both gone


def test_a_deadline_job_overtakes_an_earlier_job_without_one(owner: TenantFixture, queued: list[Any]) -> None:
    plain = job_of(owner, 3)
    due = job_of(owner, 3, deadline=timezone.now() + HOUR)
    batch_run_chunk(job_id=str(plain.id), first=0, last=2)
    assert max(due.items.values_list("finished_at", flat=True)) < min(plain.items.values_list("finished_at", flat=True))


def test_a_job_without_a_deadline_does_not_overtake_an_equal_one(owner: TenantFixture, queued: list[Any]) -> None:
    first, second = job_of(owner, 2), job_of(owner, 2)
    batch_run_chunk(job_id=str(second.id), first=0, last=1)
    assert statuses(second) == ["done", "done"] and statuses(first) == ["pending", "pending"]


def test_a_stale_entry_stalls_nobody_and_is_removed(owner: TenantFixture, queued: list[Any]) -> None:
    low, gone = job_of(owner, 2, priority="low"), job_of(owner, 2, priority="high")
    BatchJob.objects.filter(pk=gone.pk).update(status=BatchJob.Status.COMPLETED)  # finished by a process that died before leave()
    batch_run_chunk(job_id=str(low.id), first=0, last=1)
    assert statuses(low) == ["done", "done"] and str(gone.pk) not in in_the_sets()[0]


def test_an_urgent_job_whose_items_are_all_held_keeps_nobody_from_their_own(owner: TenantFixture, queued: list[Any]) -> None:
    low, high = job_of(owner, 2, priority="low"), job_of(owner, 2, priority="high")
    BatchItem.objects.filter(job=high).update(leased_until=timezone.now() + HOUR)  # another worker runs them
    assert not urgency.waits(str(high.pk))
    batch_run_chunk(job_id=str(low.id), first=0, last=1)
    assert statuses(low) == ["done", "done"] and statuses(high) == ["pending", "pending"]
    assert urgency.waits("not-a-job") is False


def test_an_urgent_job_whose_provider_is_down_is_left_to_its_own_retry(owner: TenantFixture, fakes: Any, queued: list[Any], clean_breakers: None) -> None:
    low = job_of(owner, 2, priority="low")
    high = job_of(owner, 2, priority="high", worker="openai")
    fakes.openai.mode = "503"
    batch_run_chunk(job_id=str(low.id), first=0, last=1)
    assert statuses(low) == ["done", "done"]  # paused on the urgent job, not spinning on it
    assert statuses(high) == ["pending", "pending"] and BatchItem.objects.filter(job=high, attempts=1).count() == 1


def test_at_the_deadline_the_items_left_expire_and_the_job_completes(owner: TenantFixture, queued: list[Any]) -> None:
    job = job_of(owner, 4, deadline=timezone.now() + HOUR)
    batch_run_chunk(job_id=str(job.id), first=0, last=0)
    later = timezone.now() + 2 * HOUR
    assert services.expire_if_due(job, now=later)
    job.refresh_from_db()
    assert statuses(job) == ["done", "expired", "expired", "expired"]
    assert (job.status, job.items_done, job.items_expired, job.items_failed) == ("completed", 1, 3, 0)
    expired = job.items.get(index=2)
    assert expired.error["code"] == "batch_expired" and expired.error["data"]["deadline"] == job.deadline.isoformat()
    results = services.batch_results(job=job, after=-1, limit=10)
    assert [r["status"] for r in results] == ["done", "expired", "expired", "expired"] and results[1]["error"]["code"] == "batch_expired"
    assert str(job.pk) not in in_the_sets()[0]
    assert not services.expire_if_due(job_of(owner, 1), now=later)  # no deadline: never


def test_a_chunk_run_past_the_deadline_runs_nothing(owner: TenantFixture, queued: list[Any]) -> None:
    job = job_of(owner, 2, deadline=timezone.now() + HOUR)
    BatchJob.objects.filter(pk=job.pk).update(deadline=timezone.now() - dt.timedelta(seconds=1))
    batch_run_chunk(job_id=str(job.id), first=0, last=1)
    job.refresh_from_db()
    assert statuses(job) == ["expired", "expired"] and job.status == "completed" and job.items_expired == 2


def test_the_sweep_expires_a_job_no_worker_is_running(owner: TenantFixture, queued: list[Any]) -> None:
    job = job_of(owner, 3, deadline=timezone.now() + HOUR)
    batch_recover(config=with_batch(stall_after_s=10**6), now=timezone.now() + 2 * HOUR)
    job.refresh_from_db()
    assert job.status == "completed" and job.items_expired == 3


@pytest.mark.django_db(transaction=True)
def test_through_the_api_a_deadline_is_kept_counted_and_refused_when_past(owner: TenantFixture, queued: list[Any]) -> None:
    deadline = (timezone.now() + HOUR).replace(microsecond=0)
    made = owner.client.post("/api/v1/batch", {"prompts": ["a", "b"], "deadline": deadline.isoformat()}, format="json")
    assert made.status_code == 201, made.content
    body = made.json()
    assert dt.datetime.fromisoformat(body["deadline"]) == deadline and body["counts"]["expired"] == 0
    assert body["id"] in in_the_sets()[0] and body["id"] in in_the_sets()[1]  # noted once committed
    services.expire_if_due(BatchJob.objects.get(pk=body["id"]), now=deadline + HOUR)
    after = owner.client.get(f"/api/v1/batch/{body['id']}").json()
    assert after["status"] == "completed" and after["counts"] == {"total": 2, "done": 0, "failed": 0, "expired": 2, "pending": 0, "cancelled": 0}
    assert after["progress"] == 1.0

    past = owner.client.post("/api/v1/batch", {"prompts": ["a"], "deadline": (timezone.now() - HOUR).isoformat()}, format="json")
    assert past.status_code == 400 and past.json()["error"]["code"] == "invalid_request"
    assert past.json()["error"]["data"]["fields"] == {"deadline": ["the deadline has passed already; give a time in the future"]}


@pytest.mark.django_db(transaction=True)
def test_a_cancelled_job_leaves_the_urgency_sets(owner: TenantFixture, queued: list[Any]) -> None:
    made = owner.client.post("/api/v1/batch", {"prompts": ["a"], "priority": "high", "deadline": (timezone.now() + HOUR).isoformat()}, format="json").json()
    assert made["id"] in in_the_sets()[0]
    owner.client.post(f"/api/v1/batch/{made['id']}/cancel")
    assert in_the_sets() == ([], [])


def test_with_redis_down_jobs_run_in_their_own_order_and_say_so(owner: TenantFixture, queued: list[Any], redis_down: None) -> None:
    """The urgency sets are an optimisation of order, never a condition to run."""
    low, high = job_of(owner, 2, priority="low", enter=False), job_of(owner, 2, priority="high", enter=False)
    with capture_logs() as logs:
        urgency.enter(high)
        assert urgency.more_urgent(low, 300) is None
        urgency.leave(high.pk)
    assert [e["event"] for e in logs] == ["batch_urgency_unrecorded", "batch_urgency_unrecorded"]
    assert all(e["outcome"] == "degraded" for e in logs)


def test_expired_items_are_counted_in_the_metrics(owner: TenantFixture, queued: list[Any]) -> None:
    from prometheus_client import REGISTRY

    def expired_total() -> float:
        return REGISTRY.get_sample_value("orchestrator_batch_items_total", {"priority": "high", "outcome": "batch_expired"}) or 0.0

    before = expired_total()
    job = job_of(owner, 3, priority="high", deadline=timezone.now() + HOUR)
    services.expire_if_due(job, now=timezone.now() + 2 * HOUR)
    assert expired_total() == before + 3


def test_leave_takes_a_job_out_of_both_sets(owner: TenantFixture, queued: list[Any]) -> None:
    job = job_of(owner, 1, deadline=timezone.now() + HOUR)
    assert str(job.pk) in in_the_sets()[0] and str(job.pk) in in_the_sets()[1]
    urgency.leave(job.pk)
    assert in_the_sets() == ([], [])
    assert str(job_of(owner, 1).pk) not in in_the_sets()[1]  # no deadline: in the order, not in the deadlines


def test_a_pause_keeps_an_urgent_job_from_being_asked_about_until_it_ends(owner: TenantFixture, queued: list[Any]) -> None:
    low, high = job_of(owner, 2, priority="low"), job_of(owner, 2, priority="high")
    preemption = urgency.Preemption(low, 300)
    assert preemption.urgent() == str(high.pk)
    preemption.pause(str(high.pk), 60)
    assert preemption.urgent() is None
    preemption.pause(str(high.pk), -1)  # the pause is over
    assert preemption.urgent() == str(high.pk)


def test_the_progress_gauges_count_expired_items_as_settled(owner: TenantFixture, queued: list[Any]) -> None:
    from batches.metrics import progress_families

    BatchJob.objects.filter(status__in=BatchJob.ACTIVE).update(status=BatchJob.Status.CANCELLED)  # other tests' jobs
    job = job_of(owner, 4, deadline=timezone.now() + HOUR)
    batch_run_chunk(job_id=str(job.id), first=0, last=0)
    _, pending, progress = progress_families()
    assert (pending.samples[0].value, progress.samples[0].value) == (3, 0.25)
    BatchItem.objects.filter(job=job, status=BatchItem.Status.PENDING, index=1).update(status=BatchItem.Status.EXPIRED)
    BatchJob.objects.filter(pk=job.pk).update(items_expired=1)
    _, pending, progress = progress_families()
    assert (pending.samples[0].value, progress.samples[0].value) == (2, 0.5)


def test_the_admin_shows_the_deadline_and_the_expired_count(owner: TenantFixture, queued: list[Any], admin_client: Any) -> None:
    job = job_of(owner, 2, deadline=timezone.now() + HOUR)
    services.expire_if_due(job, now=timezone.now() + 2 * HOUR)
    page = admin_client.get("/admin/batches/batchjob/").content.decode()
    assert "column-deadline" in page and "column-items_expired" in page
    detail = admin_client.get(f"/admin/batches/batchjob/{job.pk}/change/").content.decode()
    assert "batch_expired" in detail


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("raw", "kept"), [("2031-05-06T07:08:09Z", "2031-05-06T07:08:09+00:00"), ("2031-05-06T09:08:09+02:00", "2031-05-06T07:08:09+00:00")])
def test_a_deadline_is_kept_in_utc(owner: TenantFixture, queued: list[Any], raw: str, kept: str) -> None:
    made = owner.client.post("/api/v1/batch", {"prompts": ["a"], "deadline": raw}, format="json")
    assert made.status_code == 201 and made.json()["deadline"] == kept


@pytest.mark.django_db(transaction=True)
def test_a_deadline_that_is_not_a_time_is_refused(owner: TenantFixture, queued: list[Any]) -> None:
    refused = owner.client.post("/api/v1/batch", {"prompts": ["a"], "deadline": "tomorrow"}, format="json")
    assert refused.status_code == 400 and list(refused.json()["error"]["data"]["fields"]) == ["deadline"]
