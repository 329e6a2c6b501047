"""A batch job's destinations, in this process against the real Postgres: checked at
submission, delivered once the job completes (a ``file``: whole and ordered, or
absent), a failure in the middle that fails the delivery and not the job, retried
with backoff until it is delivered, and the admin's retry."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from hypothesis import given
from hypothesis import strategies as st

from batches import destinations, services
from batches.models import BatchDelivery, BatchJob
from batches.services import Prompt, batch_create, batch_run_chunk
from orchestrator_site.errors import InvalidRequest
from pipeline.config import PipelineSettings, get_config, set_config
from tests.batches.test_batch_services import with_batch
from tests.conftest import TenantFixture

pytestmark = pytest.mark.django_db


@pytest.fixture
def out(tmp_path: Path) -> Iterator[Path]:
    """The output directory of this test's config."""
    original = get_config()
    set_config(with_batch(output_dir=str(tmp_path), delivery_attempts=3, delivery_backoff_s=10))
    yield tmp_path
    set_config(original)


def submit(owner: TenantFixture, count: int, targets: list[dict[str, Any]]) -> BatchJob:
    prompts = [Prompt(f"line {i}", f"c-{i}" if i % 2 else "") for i in range(count)]
    return batch_create(tenant=owner.tenant, data={"prompts": prompts, "destinations": targets}, config=get_config())


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_completed_jobs_file_holds_every_item_in_order(owner: TenantFixture, out: Path, queued: list[Any], deliveries_queued: list[str]) -> None:
    job = submit(owner, 5, [{"kind": "file", "path": "runs/today.jsonl"}])
    batch_run_chunk(job_id=str(job.id), first=0, last=4)
    assert deliveries_queued == [str(job.id)]  # queued as the job completed
    services.batch_deliver(job_id=str(job.id))

    written = lines(out / "runs" / "today.jsonl")
    assert written == services.batch_results(job=job, after=-1, limit=100)  # the results endpoint's lines, exactly
    assert [(w["index"], w["custom_id"]) for w in written] == [(i, f"c-{i}" if i % 2 else "") for i in range(5)]
    assert all(w["status"] == "done" and w["text"] for w in written)
    (state,) = destinations.states(job)
    assert (state["kind"], state["path"], state["state"], state["attempts"], state["lines"], state["error"]) == (
        "file",
        "runs/today.jsonl",
        "delivered",
        1,
        5,
        None,
    )
    assert not list((out / "runs").glob("*.part"))


def test_a_failed_delivery_fails_nothing_else_and_is_retried_until_delivered(
    owner: TenantFixture, out: Path, queued: list[Any], deliveries_queued: list[str]
) -> None:
    job = submit(owner, 3, [{"kind": "file", "path": "shared/results.jsonl"}])
    batch_run_chunk(job_id=str(job.id), first=0, last=2)
    (out / "shared").rmdir()
    (out / "shared").write_text("a file where the directory was")  # the disk is not what it was at submission

    now = timezone.now()
    (tried,) = destinations.deliver(job, get_config(), now=now)
    assert (tried.state, tried.attempts, tried.error["code"]) == ("pending", 1, "delivery_failed")
    assert tried.error["data"]["kind"] == "file" and tried.error["data"]["attempt"] == 1
    assert tried.next_attempt_at == now + dt.timedelta(seconds=10)
    job.refresh_from_db()
    assert job.status == "completed" and len(services.batch_results(job=job, after=-1, limit=10)) == 3  # the results stay readable
    assert destinations.deliver(job, get_config(), now=now + dt.timedelta(seconds=5)) == []  # not due yet
    assert destinations.due(now + dt.timedelta(seconds=5)) == [] and destinations.due(now + dt.timedelta(seconds=11)) == [str(job.id)]

    (tried,) = destinations.deliver(job, get_config(), now=now + dt.timedelta(seconds=11))
    assert (tried.state, tried.attempts, tried.next_attempt_at) == ("pending", 2, now + dt.timedelta(seconds=11 + 20))  # doubled

    (out / "shared").unlink()  # repaired
    (tried,) = destinations.deliver(job, get_config(), now=now + dt.timedelta(seconds=40))
    assert (tried.state, tried.attempts, tried.error) == ("delivered", 3, None)
    assert [w["index"] for w in lines(out / "shared" / "results.jsonl")] == [0, 1, 2]


def test_after_its_last_attempt_a_delivery_fails_until_the_admin_retries_it(
    owner: TenantFixture, out: Path, queued: list[Any], deliveries_queued: list[str], admin_client: Any
) -> None:
    job = submit(owner, 2, [{"kind": "file", "path": "blocked/r.jsonl"}])
    batch_run_chunk(job_id=str(job.id), first=0, last=1)
    (out / "blocked").rmdir()
    (out / "blocked").write_text("x")
    when = timezone.now()
    for attempt in range(3):
        destinations.deliver(job, get_config(), now=when + dt.timedelta(hours=attempt))
    delivery = job.deliveries.get()
    assert (delivery.state, delivery.attempts, delivery.next_attempt_at) == ("failed", 3, None)
    assert destinations.due(when + dt.timedelta(days=1)) == []  # failed: nobody tries it again on their own

    (out / "blocked").unlink()
    deliveries_queued.clear()
    response = admin_client.post("/admin/batches/batchjob/", {"action": "retry_deliveries", "_selected_action": [str(job.id)]}, follow=True)
    assert response.status_code == 200 and deliveries_queued == [str(job.id)]
    services.batch_deliver(job_id=str(job.id))
    delivery.refresh_from_db()
    assert (delivery.state, delivery.attempts) == ("delivered", 1)
    page = admin_client.get(f"/admin/batches/batchjob/{job.id}/change/").content.decode()
    assert "blocked/r.jsonl" in page and "delivered" in page


def test_a_delivered_file_is_replaced_whole_and_never_half_written(owner: TenantFixture, out: Path, queued: list[Any], deliveries_queued: list[str]) -> None:
    (out / "same.jsonl").write_text("an older run's results\n")
    job = submit(owner, 4, [{"kind": "file", "path": "same.jsonl"}])
    BatchJob.objects.filter(pk=job.pk).update(status=BatchJob.Status.COMPLETED)  # delivered as it stands
    destinations.deliver(job, get_config())
    assert [w["status"] for w in lines(out / "same.jsonl")] == []  # nothing had finished: an empty file, not the old one
    assert sorted(p.name for p in out.iterdir()) == ["same.jsonl"]


def test_a_cancelled_job_is_not_delivered_and_a_job_of_refused_prompts_is_at_once(
    owner: TenantFixture, out: Path, queued: list[Any], deliveries_queued: list[str]
) -> None:
    job = submit(owner, 2, [{"kind": "file", "path": "c.jsonl"}])
    services.batch_cancel(tenant_id=str(owner.tenant.id), job_id=job.id)
    assert destinations.due(timezone.now()) == []
    too_long = "x" * (get_config().limits.max_prompt_chars + 1)
    refused = batch_create(
        tenant=owner.tenant,
        data={"prompts": [Prompt("", too_large=f"{too_long[:10]}…")], "destinations": [{"kind": "file", "path": "r.jsonl"}]},
        config=get_config(),
    )
    assert refused.status == "completed" and destinations.due(timezone.now()) == [str(refused.id)]


def test_the_sweep_queues_the_deliveries_that_are_due(owner: TenantFixture, out: Path, queued: list[Any], deliveries_queued: list[str]) -> None:
    job = submit(owner, 1, [{"kind": "file", "path": "s.jsonl"}])
    BatchJob.objects.filter(pk=job.pk).update(status=BatchJob.Status.COMPLETED)  # its delivery message was lost
    services.batch_recover(config=get_config())
    assert deliveries_queued == [str(job.id)]


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"kind": "ftp", "host": "b"}, "destinations[0].kind"),
        ({"kind": "s3", "bucket": "b"}, "destinations[0].bucket"),  # too short for a bucket name
        ("file", "destinations[0].kind"),
        ({"kind": "file", "path": "/etc/passwd"}, "destinations[0].path"),
        ({"kind": "file", "path": "../outside.jsonl"}, "destinations[0].path"),
        ({"kind": "file", "path": "dir/"}, "destinations[0].path"),
        ({"kind": "file", "path": ""}, "destinations[0].path"),
        ({"kind": "file", "path": 7}, "destinations[0].path"),
        ({"kind": "file", "path": "a.jsonl", "mode": "append"}, "destinations[0].mode"),
    ],
)
def test_a_bad_destination_refuses_the_job_naming_it(owner: TenantFixture, out: Path, raw: Any, field: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        destinations.validated([raw], get_config())
    assert refused.value.data["field"] == field


def test_the_list_itself_is_checked(out: Path) -> None:
    for raw in ({"kind": "file"}, [{"kind": "file", "path": f"{i}.jsonl"} for i in range(9)]):
        with pytest.raises(InvalidRequest) as refused:
            destinations.validated(raw, get_config())
        assert refused.value.data["field"] == "destinations"
    assert destinations.validated(None, get_config()) == []


def test_an_output_directory_that_cannot_be_written_refuses_the_job(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file, not a directory")
    config = PipelineSettings(batch=get_config().batch.model_copy(update={"output_dir": str(tmp_path / "taken")}))
    with pytest.raises(InvalidRequest) as refused:
        destinations.validated([{"kind": "file", "path": "a.jsonl"}], config)
    assert "cannot be written" in refused.value.message


@pytest.mark.django_db(transaction=True)
def test_through_the_api_the_job_shows_its_destinations(owner: TenantFixture, out: Path, queued: list[Any], deliveries_queued: list[str]) -> None:
    made = owner.client.post("/api/v1/batch", {"prompts": ["a"], "destinations": [{"kind": "file", "path": "api.jsonl"}]}, format="json")
    assert made.status_code == 201, made.content
    (shown,) = made.json()["destinations"]
    assert (shown["kind"], shown["path"], shown["state"], shown["attempts"]) == ("file", "api.jsonl", "pending", 0)
    listed = owner.client.get("/api/v1/batch").json()["results"][0]
    assert listed["destinations"] == made.json()["destinations"]
    bad = owner.client.post("/api/v1/batch", {"prompts": ["a"], "destinations": [{"kind": "ftp"}]}, format="json")
    assert bad.status_code == 400 and bad.json()["error"]["data"]["field"] == "destinations[0].kind"
    assert BatchDelivery.objects.filter(job__tenant=owner.tenant).count() == 1  # the refused job left nothing


def test_a_delivery_is_made_once_when_two_workers_reach_it(owner: TenantFixture, out: Path, queued: list[Any], deliveries_queued: list[str]) -> None:
    job = submit(owner, 2, [{"kind": "file", "path": "once.jsonl"}])
    batch_run_chunk(job_id=str(job.id), first=0, last=1)
    now = timezone.now()
    first = destinations.deliver(job, get_config(), now=now)
    second = destinations.deliver(job, get_config(), now=now)  # a duplicate message, at the same moment
    assert [d.state for d in first] == ["delivered"] and second == []
    assert job.deliveries.get().attempts == 1


def test_a_delivery_whose_worker_died_is_due_again_after_its_claim(owner: TenantFixture, out: Path, queued: list[Any], deliveries_queued: list[str]) -> None:
    job = submit(owner, 1, [{"kind": "file", "path": "died.jsonl"}])
    BatchJob.objects.filter(pk=job.pk).update(status=BatchJob.Status.COMPLETED)
    now = timezone.now()
    claim = now + dt.timedelta(seconds=60)  # what deliver() sets before it writes
    BatchDelivery.objects.filter(job=job).update(next_attempt_at=claim)
    assert destinations.due(now) == [] and destinations.due(claim) == [str(job.id)]
    (tried,) = destinations.deliver(job, get_config(), now=claim)
    assert tried.state == "delivered" and tried.attempts == 1


def test_a_large_job_is_written_a_page_at_a_time_in_order(owner: TenantFixture, out: Path, queued: list[Any], deliveries_queued: list[str]) -> None:
    from batches.models import BatchItem

    count = services.RESULTS_PAGE * 2 + 7
    job = submit(owner, count, [{"kind": "file", "path": "large.jsonl"}])
    BatchItem.objects.filter(job=job).update(status=BatchItem.Status.DONE, output="ok", finish_reason="stop", usage={})
    BatchJob.objects.filter(pk=job.pk).update(status=BatchJob.Status.COMPLETED, items_done=count)
    (tried,) = destinations.deliver(job, get_config())
    written = lines(out / "large.jsonl")
    assert tried.lines == count and [w["index"] for w in written] == list(range(count))


def test_failed_and_expired_items_are_delivered_with_their_errors(owner: TenantFixture, out: Path, queued: list[Any], deliveries_queued: list[str]) -> None:
    job = submit(owner, 3, [{"kind": "file", "path": "mixed.jsonl"}])
    BatchJob.objects.filter(pk=job.pk).update(deadline=timezone.now() + dt.timedelta(hours=1))
    job.refresh_from_db()
    batch_run_chunk(job_id=str(job.id), first=0, last=0)
    services.expire_if_due(job, now=timezone.now() + dt.timedelta(hours=2))
    services.batch_deliver(job_id=str(job.id))
    written = lines(out / "mixed.jsonl")
    assert [w["status"] for w in written] == ["done", "expired", "expired"]
    assert written[1]["error"]["code"] == "batch_expired" and "text" not in written[1]


def test_a_job_not_completed_is_not_delivered(owner: TenantFixture, out: Path, queued: list[Any], deliveries_queued: list[str]) -> None:
    job = submit(owner, 2, [{"kind": "file", "path": "early.jsonl"}])
    services.batch_deliver(job_id=str(job.id))
    assert job.deliveries.get().attempts == 0 and not (out / "early.jsonl").exists()
    services.batch_deliver(job_id="6f1c2a4e-0000-4000-8000-000000000000")  # no such job: nothing, no error


def test_a_delivery_that_crashes_is_logged_and_left_for_the_sweep(owner: TenantFixture, out: Path, queued: list[Any], deliveries_queued: list[str]) -> None:
    from structlog.testing import capture_logs

    job = submit(owner, 1, [{"kind": "file", "path": "crash.jsonl"}])
    BatchJob.objects.filter(pk=job.pk).update(status=BatchJob.Status.COMPLETED)
    BatchDelivery.objects.filter(job=job).update(target={"kind": "file"})  # a row no version of us writes
    with capture_logs() as logs:
        services.batch_deliver(job_id=str(job.id))
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["batch_delivery_crashed"]
    assert job.deliveries.get().state == "pending"


def test_the_state_shows_when_it_was_delivered_and_when_it_is_tried_next(
    owner: TenantFixture, out: Path, queued: list[Any], deliveries_queued: list[str]
) -> None:
    job = submit(owner, 1, [{"kind": "file", "path": "a/b.jsonl"}, {"kind": "file", "path": "c.jsonl"}])
    BatchJob.objects.filter(pk=job.pk).update(status=BatchJob.Status.COMPLETED)
    (out / "a").rmdir()
    (out / "a").write_text("x")
    now = timezone.now()
    destinations.deliver(job, get_config(), now=now)
    failed, delivered = destinations.states(job)
    assert (failed["path"], failed["state"], failed["delivered_at"]) == ("a/b.jsonl", "pending", None)
    assert dt.datetime.fromisoformat(failed["next_attempt_at"]) == now + dt.timedelta(seconds=10)
    assert (delivered["path"], delivered["state"], delivered["next_attempt_at"]) == ("c.jsonl", "delivered", None)
    assert dt.datetime.fromisoformat(delivered["delivered_at"]) >= now


@given(parts=st.lists(st.sampled_from(["a", "b.jsonl", "..", ".", "c d", "é"]), min_size=1, max_size=5))
def test_no_accepted_path_leaves_the_output_directory(parts: list[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("paths")
    config = PipelineSettings(batch=get_config().batch.model_copy(update={"output_dir": str(root)}))
    raw = "/".join(parts)
    try:
        (accepted,) = destinations.validated([{"kind": "file", "path": raw}], config)
    except InvalidRequest:
        assert ".." in parts or raw.endswith("/")
    else:
        assert ".." not in parts and (root / accepted["path"]).resolve().is_relative_to(root.resolve())


@pytest.mark.django_db(transaction=True)
def test_through_the_api_destinations_must_be_a_list(owner: TenantFixture, out: Path, queued: list[Any]) -> None:
    refused = owner.client.post("/api/v1/batch", {"prompts": ["a"], "destinations": {"kind": "file", "path": "x.jsonl"}}, format="json")
    assert refused.status_code == 400 and refused.json()["error"]["data"]["field"] == "destinations"
    none = owner.client.post("/api/v1/batch", {"prompts": ["a"], "destinations": None}, format="json")
    assert none.status_code == 201 and none.json()["destinations"] == []


def test_a_retry_leaves_a_delivered_destination_as_it_is(owner: TenantFixture, out: Path, queued: list[Any], deliveries_queued: list[str]) -> None:
    job = submit(owner, 1, [{"kind": "file", "path": "kept.jsonl"}])
    BatchJob.objects.filter(pk=job.pk).update(status=BatchJob.Status.COMPLETED)
    (delivered,) = destinations.deliver(job, get_config())
    destinations.retry(delivered)
    delivered.refresh_from_db()
    assert (delivered.state, delivered.attempts) == ("delivered", 1)
    assert destinations.due(timezone.now() + dt.timedelta(days=1)) == []
