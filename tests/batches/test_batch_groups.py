"""A chunk claims its items ``batch.claim_group`` at a time and records each group in
one transaction: a group cut short (the provider down, a more urgent job, a cancel)
records what ran and gives the rest back with their attempt uncounted; a duplicate
run records nothing twice; the group's answers are one ledger INSERT."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import DatabaseError
from django.db.models import Count
from structlog.testing import capture_logs

from batches import services
from batches.models import BatchJob
from batches.services import Prompt, batch_cancel, batch_create, batch_run_chunk
from pipeline.models import UsageEntry
from tests.batches.test_batch_deadlines import _no_urgency  # noqa: F401 - autouse: no other test's job in the urgency sets
from tests.batches.test_batch_services import make_job, statuses, with_batch
from tests.conftest import TenantFixture

pytestmark = pytest.mark.django_db


def after_first_item(monkeypatch: pytest.MonkeyPatch, then: Any) -> None:
    """``then()`` once, after the first item a chunk runs."""
    run_item = services._run_item
    ran: list[int] = []

    def wrapped(job: BatchJob, item: Any, config: Any) -> Any:
        outcome = run_item(job, item, config)
        if not ran:
            ran.append(item.index)
            then()
        return outcome

    monkeypatch.setattr(services, "_run_item", wrapped)


def test_a_provider_down_mid_group_records_what_ran_and_gives_the_rest_back(
    owner: TenantFixture, fakes: Any, queued: list[tuple[Any, ...]], pipeline_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline_config(with_batch(claim_group=4, retry_delay_s=5))
    job = make_job(owner, ["a", "b", "c", "d"], worker="openai")
    after_first_item(monkeypatch, lambda: setattr(fakes.openai, "mode", "503"))
    batch_run_chunk(job_id=str(job.id), first=0, last=3)
    items = list(job.items.order_by("index").values_list("status", "attempts", "leased_until"))
    assert items == [("done", 1, None), ("pending", 1, None), ("pending", 0, None), ("pending", 0, None)]
    assert job.items.get(index=1).error["code"] == "worker_unavailable"
    assert queued == [(str(job.id), 0, 3, "batch.default", 5)]
    job.refresh_from_db()
    assert (job.items_done, job.items_failed) == (1, 0)


def test_a_more_urgent_job_arriving_mid_group_runs_before_the_rest_of_it(
    owner: TenantFixture, queued: list[tuple[Any, ...]], pipeline_config: Any, monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any
) -> None:
    config = pipeline_config(with_batch(claim_group=4))
    with django_capture_on_commit_callbacks(execute=True):  # each job's urgency noted, as on its commit
        low = make_job(owner, ["l0", "l1", "l2", "l3"], priority="low")
    urgent: list[BatchJob] = []

    def submit_high() -> None:
        with django_capture_on_commit_callbacks(execute=True):
            urgent.append(batch_create(tenant=owner.tenant, data={"prompts": [Prompt("h0"), Prompt("h1")], "priority": "high"}, config=config))

    after_first_item(monkeypatch, submit_high)
    batch_run_chunk(job_id=str(low.id), first=0, last=3)
    (high,) = urgent
    assert statuses(low) == ["done"] * 4 and statuses(high) == ["done"] * 2
    assert set(low.items.values_list("attempts", flat=True)) == {1}  # given back, then run once each
    high_done = max(high.items.values_list("finished_at", flat=True))
    assert low.items.get(index=0).finished_at < high_done < min(low.items.filter(index__gt=0).values_list("finished_at", flat=True))


def test_a_cancel_mid_group_stops_it_after_the_item_being_run(
    owner: TenantFixture, queued: list[tuple[Any, ...]], pipeline_config: Any, monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any
) -> None:
    pipeline_config(with_batch(claim_group=5))
    with django_capture_on_commit_callbacks(execute=True):  # in the urgency set: the cancel takes it out, which the group sees
        job = make_job(owner, ["a", "b", "c", "d", "e"])
    after_first_item(monkeypatch, lambda: batch_cancel(tenant_id=str(owner.tenant.id), job_id=job.id))
    batch_run_chunk(job_id=str(job.id), first=0, last=4)
    assert statuses(job) == ["done", "pending", "pending", "pending", "pending"]
    assert set(job.items.filter(index__gt=0).values_list("attempts", "leased_until")) == {(0, None)}


def test_a_group_is_one_claim_one_record_and_one_ledger_insert(
    owner: TenantFixture, queued: list[tuple[Any, ...]], pipeline_config: Any, django_assert_max_num_queries: Any, django_capture_on_commit_callbacks: Any
) -> None:
    pipeline_config(with_batch(claim_group=10))
    with django_capture_on_commit_callbacks(execute=True):  # its urgency noted: Redis vouches that it is not cancelled
        job = make_job(owner, [f"p{i}" for i in range(10)])
    with django_assert_max_num_queries(22):  # savepoints and SET LOCALs included; per item it was 7 (claim 4, record 2, ledger 1): 70 and more
        batch_run_chunk(job_id=str(job.id), first=0, last=9)
    assert statuses(job) == ["done"] * 10
    rows = UsageEntry.objects.filter(request_id__startswith=job.id.hex).aggregate(n=Count("id"))
    assert rows["n"] == 10


def test_a_duplicate_group_records_nothing_twice(owner: TenantFixture, queued: list[tuple[Any, ...]]) -> None:
    job = make_job(owner, ["a", "b", "c"])
    batch_run_chunk(job_id=str(job.id), first=0, last=2)
    items = list(job.items.order_by("index"))
    before = list(job.items.order_by("index").values_list("output", "finished_at", "status"))
    failed = services.Outcome(items[0], error=services.OrchestratorError("late duplicate"))
    services._record_many(job, [failed, services.Outcome(items[1], error=services.OrchestratorError("another"))])
    job.refresh_from_db()
    assert (job.items_done, job.items_failed) == (3, 0)
    assert list(job.items.order_by("index").values_list("output", "finished_at", "status")) == before
    services._record_many(job, [])  # nothing to record: no statement


def test_postgres_refusing_the_groups_ledger_rows_is_logged_and_the_answers_stand(
    owner: TenantFixture, queued: list[tuple[Any, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any, **__: Any) -> None:
        raise DatabaseError("disk full")

    job = make_job(owner, ["a", "b"])
    monkeypatch.setattr(UsageEntry.objects, "bulk_create", broken)
    with capture_logs() as logs:
        batch_run_chunk(job_id=str(job.id), first=0, last=1)
    assert statuses(job) == ["done", "done"]
    unrecorded = [e for e in logs if e["event"] == "usage_unrecorded"]
    assert [(e["rows"], e["error_type"], e["request_id"]) for e in unrecorded] == [(2, "DatabaseError", f"{job.id.hex}-0")]


def test_items_tried_before_are_claimed_alone(owner: TenantFixture, queued: list[tuple[Any, ...]], pipeline_config: Any) -> None:
    config = pipeline_config(with_batch(claim_group=4, lease_s=60))
    job = make_job(owner, [f"p{i}" for i in range(6)])
    assert [item.index for item in services._claim(job, 0, 5, config)] == [0, 1, 2, 3]
    job.items.update(leased_until=None)  # their worker died: the leases ran out
    assert [item.index for item in services._claim(job, 0, 5, config)] == [0]  # tried before: alone
    assert [item.index for item in services._claim(job, 1, 5, config)] == [1]
    job.items.filter(index__in=[2, 3]).update(attempts=0)
    assert [item.index for item in services._claim(job, 2, 5, config)] == [2, 3, 4, 5]  # fresh ones: a group
    job.items.filter(index=4).update(attempts=1, leased_until=None)
    job.items.filter(index__in=[2, 3, 5]).update(attempts=0, leased_until=None)
    assert [item.index for item in services._claim(job, 2, 5, config)] == [2, 3]  # up to the one tried before


def test_an_item_that_kills_its_worker_fails_alone(owner: TenantFixture, queued: list[tuple[Any, ...]], pipeline_config: Any) -> None:
    config = pipeline_config(with_batch(claim_group=4, max_attempts=2))
    job = make_job(owner, ["a", "poison", "c", "d"])
    for _ in range(3):  # three workers died holding the poison item (the first holding its whole group)
        claimed = services._claim(job, 0, 3, config)
        assert 1 in [item.index for item in claimed]
        job.items.update(leased_until=None)
        if claimed[0].index == 0:
            services._record_many(job, [services.Outcome(claimed[0], error=services.OrchestratorError("ran"))])
    batch_run_chunk(job_id=str(job.id), first=0, last=3)
    items = {item.index: item for item in job.items.all()}
    assert items[1].status == "failed" and "interrupted" in items[1].error["message"]
    assert (items[2].status, items[3].status) == ("done", "done")  # one extra attempt each, not three


@pytest.mark.django_db(transaction=True)  # the worker's case: the claim's and the record's transactions are their own
def test_claims_and_records_commit_without_waiting_for_the_disk_and_only_they(
    owner: TenantFixture, queued: list[tuple[Any, ...]], pipeline_config: Any
) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    pipeline_config(with_batch(claim_group=2))
    job = make_job(owner, ["a", "b"])
    with CaptureQueriesContext(connection) as captured:
        batch_run_chunk(job_id=str(job.id), first=0, last=1)
    sql = [q["sql"] for q in captured.captured_queries]
    claim = next(i for i, q in enumerate(sql) if "SKIP LOCKED" in q)
    record = next(i for i, q in enumerate(sql) if q.lstrip().startswith("UPDATE batches_batchitem AS i"))
    assert sql[claim - 1] == sql[record - 1] == "SET LOCAL synchronous_commit TO OFF"
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"  # for those transactions alone


def test_inside_a_callers_transaction_the_commit_setting_is_left_alone(owner: TenantFixture, queued: list[tuple[Any, ...]]) -> None:
    from django.db import connection

    job = make_job(owner, ["a"])
    batch_run_chunk(job_id=str(job.id), first=0, last=0)  # inside the test's transaction
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"
