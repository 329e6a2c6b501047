"""What operators see of batch jobs: the admin, the progress gauges, the task shells
and the scheduler's entry; the models' rules."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import IntegrityError, transaction
from django.test import Client

from batches import metrics, services, tasks
from batches.models import BatchItem, BatchJob
from orchestrator_site.celery import app
from tests.conftest import TenantFixture
from tests.orchestrator_site.test_metrics import parse, value
from tests.pipeline.test_metrics_flow import gateway_scrape


def job(owner: TenantFixture, status: str = "queued", total: int = 4, done: int = 0, failed: int = 0, priority: str = "default") -> BatchJob:
    made = BatchJob.objects.create(
        tenant=owner.tenant,
        status=status,
        priority=priority,
        worker="echo",
        model="echo-1",
        max_tokens=8,
        items_total=total,
        items_done=done,
        items_failed=failed,
    )
    BatchItem.objects.bulk_create(BatchItem(job=made, index=i, prompt=f"p{i}") for i in range(total))
    return made


@pytest.mark.django_db(transaction=True)  # the scrape reads Postgres on a thread of its own
def test_progress_gauges_count_only_the_active_jobs(owner: TenantFixture) -> None:
    job(owner, "running", total=10, done=3, failed=1)
    job(owner, "queued", total=10)
    job(owner, "completed", total=100, done=100)
    job(owner, "cancelled", total=50, done=5)
    samples = gateway_scrape()
    assert [value(samples, "orchestrator_batch_jobs", status=s) for s in ("queued", "running", "completed", "cancelled")] == [1, 1, 1, 1]
    assert value(samples, "orchestrator_batch_items_pending") == 16
    assert value(samples, "orchestrator_batch_progress_ratio") == pytest.approx(4 / 20)
    assert value(samples, "orchestrator_metrics_source_up", source="postgres") == 1


@pytest.mark.django_db(transaction=True)
def test_with_no_active_job_progress_is_whole_and_nothing_pends(owner: TenantFixture) -> None:
    job(owner, "completed", total=2, done=2)
    samples = gateway_scrape()
    assert value(samples, "orchestrator_batch_progress_ratio") == 1.0 and value(samples, "orchestrator_batch_items_pending") == 0
    assert value(samples, "orchestrator_batch_jobs", status="queued") == 0 and value(samples, "orchestrator_batch_jobs", status="completed") == 1


@pytest.mark.django_db
def test_a_scrape_while_postgres_is_unreachable_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.db import OperationalError

    def down() -> Any:
        raise OperationalError('connection to server at "127.0.0.1", port 5432 failed: Connection refused')

    monkeypatch.setattr(metrics, "progress_families", down)
    samples = gateway_scrape()
    assert value(samples, "orchestrator_metrics_source_up", source="postgres") == 0
    assert not any(name.startswith("orchestrator_batch_jobs") for name, _ in samples)  # missing, not zero
    assert value(samples, "orchestrator_metrics_source_up", source="redis") == 1  # the others still read


@pytest.mark.django_db
def test_items_are_counted_by_priority_and_outcome() -> None:
    before = parse(Client().get("/metrics").content.decode())
    metrics.item_finished("high", "ok")
    metrics.item_finished("high", "ok")
    metrics.item_finished("high", "retry_later")
    after = parse(Client().get("/metrics").content.decode())
    assert (
        value(after, "orchestrator_batch_items_total", priority="high", outcome="ok")
        - (value(before, "orchestrator_batch_items_total", priority="high", outcome="ok") or 0)
        == 2
    )
    assert value(after, "orchestrator_batch_items_total", priority="high", outcome="retry_later") >= 1


@pytest.mark.django_db
def test_an_item_is_unique_within_its_job_and_rows_read_well(owner: TenantFixture) -> None:
    made = job(owner, total=1, priority="low")
    assert made.queue == "batch.low" and str(made) == f"{made.id} (queued)" and str(made.items.get()) == f"{made.id}#0"
    with pytest.raises(IntegrityError), transaction.atomic():
        BatchItem.objects.create(job=made, index=0, prompt="again")


@pytest.mark.django_db
def test_the_admin_lists_jobs_and_items_read_only_and_cancels(staff: Client, owner: TenantFixture) -> None:
    running = job(owner, "running", total=3, done=1)
    finished = job(owner, "completed", total=1, done=1)
    page = staff.get("/admin/batches/batchjob/", {"status__exact": "running"}).content.decode()
    assert str(running.id) in page and str(finished.id) not in page
    assert staff.get("/admin/batches/batchjob/add/").status_code == 403
    items = staff.get("/admin/batches/batchitem/", {"q": str(running.id)}).content.decode()
    assert f"{running.id}#2" in items and f"{finished.id}#0" not in items
    resp = staff.post("/admin/batches/batchjob/", {"action": "cancel", "_selected_action": [str(running.id), str(finished.id)]}, follow=True)
    assert "Cancelled 1 job(s)." in resp.content.decode()
    running.refresh_from_db()
    finished.refresh_from_db()
    assert (running.status, finished.status) == ("cancelled", "completed")


def test_the_tasks_hand_their_work_to_the_services(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(services, "batch_run_chunk", lambda **kw: seen.append(("chunk", kw)))
    monkeypatch.setattr(services, "batch_recover_boundary", lambda: seen.append(("sweep",)))
    tasks.run_batch_chunk.run("job", 0, 24)
    tasks.recover_batches.run()
    assert seen == [("chunk", {"job_id": "job", "first": 0, "last": 24}), ("sweep",)]


def test_chunks_are_acknowledged_after_their_run_and_given_back_when_a_worker_dies() -> None:
    task = app.tasks["batches.tasks.run_batch_chunk"]
    assert task.acks_late and task.reject_on_worker_lost and task.ignore_result


def test_the_scheduler_sweeps_every_minute_on_the_high_batch_queue() -> None:
    entry = app.conf.beat_schedule["batch-recovery"]
    assert entry["task"] == "batches.tasks.recover_batches" and entry["task"] in app.tasks
    assert entry["schedule"] == 60 and entry["options"]["queue"] == "batch.high"


def test_the_example_config_documents_every_batch_setting_with_its_default() -> None:
    import tomllib

    from pipeline.config import BatchConfig
    from tests.conftest import ROOT

    documented = tomllib.loads((ROOT / "pipeline.example.toml").read_text())["batch"]
    assert documented == BatchConfig().model_dump()


@pytest.mark.parametrize(
    ("field", "bad"),
    [("max_items", 0), ("max_body_mb", 2048), ("chunk_size", 0), ("max_attempts", 0), ("retry_delay_s", -1), ("lease_s", 0), ("stall_after_s", 0)],
)
def test_batch_settings_out_of_range_are_refused(field: str, bad: float) -> None:
    from pydantic import ValidationError

    from pipeline.config import BatchConfig

    with pytest.raises(ValidationError, match=field):
        BatchConfig(**{field: bad})


@pytest.mark.django_db
def test_a_jobs_admin_page_lists_its_items_and_results(staff: Any, owner: TenantFixture) -> None:
    from batches.services import Prompt, batch_create, batch_run_chunk
    from pipeline.config import get_config

    job = batch_create(tenant=owner.tenant, data={"prompts": [Prompt("first words", "a"), Prompt("second words", "b")]}, config=get_config())
    batch_run_chunk(job_id=str(job.id), first=0, last=0)
    page = staff.get(f"/admin/batches/batchjob/{job.id}/change/").content.decode()
    assert "<td>0</td><td>a</td><td>done</td><td>1</td><td>first words" in page
    assert "<td>1</td><td>b</td><td>pending</td><td>0</td><td></td>" in page
    assert f"/admin/batches/batchitem/?job__id__exact={job.id}" in page and "all 2 items" in page
    listed = staff.get(f"/admin/batches/batchitem/?job__id__exact={job.id}")
    assert listed.status_code == 200 and listed.context["cl"].result_count == 2  # the link filters the items to this job
