"""The batch admin for operators: a progress bar, the results to download, failed
items run again (a native job's and an OpenAI batch's, whose files are made anew),
and the OpenAI batches' list with their statuses."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest

from batches import services
from batches.models import BatchFile, BatchItem, BatchJob, OpenAIBatch
from batches.services import Prompt, batch_create, batch_retry_failed, batch_run_chunk
from pipeline.config import get_config
from tests.batches.test_openai_batches import content, create, deliver, fetch, job_of, jsonl, line, run_all
from tests.conftest import TenantFixture

pytestmark = pytest.mark.django_db


def half_failed(owner: TenantFixture) -> BatchJob:
    """Four items: two done, one failed when it ran, one refused at submission."""
    limit = get_config().limits.max_prompt_chars
    prompts = [Prompt("a", "a"), Prompt("b", "b"), Prompt("c", "c"), Prompt("", "too-long", too_large=f"prompt is longer than {limit} characters")]
    job = batch_create(tenant=owner.tenant, data={"prompts": prompts, "worker": "echo"}, config=get_config())
    batch_run_chunk(job_id=str(job.id), first=0, last=3)
    BatchItem.objects.filter(job=job, index=2).update(status=BatchItem.Status.FAILED, error={"code": "worker_unavailable", "message": "down", "data": {}})
    BatchJob.objects.filter(pk=job.pk).update(items_done=2, items_failed=2)
    job.refresh_from_db()
    return job


def test_a_jobs_progress_is_a_bar_with_its_counts(staff: Any, owner: TenantFixture, queued: list[Any]) -> None:
    job = batch_create(tenant=owner.tenant, data={"prompts": [Prompt(p) for p in "abcd"], "worker": "echo"}, config=get_config())
    batch_run_chunk(job_id=str(job.id), first=0, last=1)
    page = staff.get("/admin/batches/batchjob/").content.decode()
    assert '<progress value="2" max="4"></progress> 50% (2 done, 0 failed, 0 expired of 4)' in page
    detail = staff.get(f"/admin/batches/batchjob/{job.id}/change/").content.decode()
    assert '<progress value="2" max="4">' in detail and f"/admin/batches/batchjob/{job.id}/results/" in detail


def test_the_results_download_as_ndjson_for_staff_only(staff: Any, owner: TenantFixture, queued: list[Any], client: Any) -> None:
    job = batch_create(tenant=owner.tenant, data={"prompts": [Prompt(f"p{i}", f"c{i}") for i in range(3)], "worker": "echo"}, config=get_config())
    batch_run_chunk(job_id=str(job.id), first=0, last=1)
    resp = staff.get(f"/admin/batches/batchjob/{job.id}/results/")
    assert resp.status_code == 200 and resp["Content-Type"] == "application/x-ndjson" and f"batch-{job.id}.jsonl" in resp["Content-Disposition"]
    with warnings.catch_warnings():  # the test client reads the async stream synchronously
        warnings.simplefilter("ignore")
        rows = [json.loads(row) for row in b"".join(resp).decode().splitlines()]
    assert [(r["index"], r["custom_id"], r["status"]) for r in rows] == [(0, "c0", "done"), (1, "c1", "done")]
    assert client.get(f"/admin/batches/batchjob/{job.id}/results/").status_code == 302  # to the login page
    assert staff.get("/admin/batches/batchjob/6f1c2a4e-0000-4000-8000-000000000000/results/").status_code == 404


def test_failed_items_run_again_and_refused_ones_stay_failed(
    staff: Any, owner: TenantFixture, queued: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    job = half_failed(owner)
    queued.clear()
    with django_capture_on_commit_callbacks(execute=True):
        resp = staff.post("/admin/batches/batchjob/", {"action": "retry_failed_items", "_selected_action": [str(job.id)]}, follow=True)
    assert "1 failed item(s) are being run again." in resp.content.decode()
    job.refresh_from_db()
    assert (job.status, job.items_done, job.items_failed, job.finished_at) == ("running", 2, 1, None)
    retried = job.items.get(index=2)
    assert (retried.status, retried.attempts, retried.error) == ("pending", 0, None)
    assert [q[:3] for q in queued] == [(str(job.id), 0, get_config().batch.chunk_size - 1)]
    batch_run_chunk(job_id=str(job.id), first=0, last=3)
    job.refresh_from_db()
    assert (job.status, job.items_done, job.items_failed) == ("completed", 3, 1) and job.items.get(index=3).status == "failed"


def test_only_a_completed_job_with_items_that_ran_is_retried(owner: TenantFixture, queued: list[Any]) -> None:
    running = batch_create(tenant=owner.tenant, data={"prompts": [Prompt("a")], "worker": "echo"}, config=get_config())
    assert batch_retry_failed(job_id=running.id) == 0 and BatchJob.objects.get(pk=running.pk).status == "queued"
    clean = batch_create(tenant=owner.tenant, data={"prompts": [Prompt("a")], "worker": "echo"}, config=get_config())
    batch_run_chunk(job_id=str(clean.id), first=0, last=0)
    assert batch_retry_failed(job_id=clean.id) == 0 and BatchJob.objects.get(pk=clean.pk).status == "completed"


def test_a_retried_openai_batch_makes_its_files_anew(owner: TenantFixture, fakes: Any, queued: list[Any], deliveries_queued: list[str]) -> None:
    batch = create(owner, line("a", "x") + "\n" + line("b", "y"))
    run_all(batch)
    job = job_of(batch)
    BatchItem.objects.filter(job=job, custom_id="b").update(status=BatchItem.Status.FAILED, error={"code": "worker_unavailable", "message": "down", "data": {}})
    BatchJob.objects.filter(pk=job.pk).update(items_done=1, items_failed=1)
    deliver(deliveries_queued)
    before = fetch(owner, batch)
    assert before["status"] == "completed" and before["request_counts"]["failed"] == 1 and before["error_file_id"]
    assert batch_retry_failed(job_id=job.id) == 1
    again = fetch(owner, batch)
    assert again["status"] == "in_progress" and again["output_file_id"] is None and again["error_file_id"] is None
    assert not BatchFile.objects.filter(pk__in=[before["output_file_id"], before["error_file_id"]]).exists()
    run_all(batch)
    deliver(deliveries_queued)
    done = fetch(owner, batch)
    assert done["status"] == "completed" and done["request_counts"] == {"total": 2, "completed": 2, "failed": 0} and done["error_file_id"] is None
    assert [r["custom_id"] for r in jsonl(content(owner, done["output_file_id"]))] == ["a", "b"]


def test_the_openai_batches_are_listed_with_their_status(staff: Any, owner: TenantFixture, fakes: Any, queued: list[Any], deliveries_queued: list[str]) -> None:
    batch = create(owner, line("a", "x"))
    page = staff.get("/admin/batches/openaibatch/").content.decode()
    assert batch["id"] in page and "in_progress" in page
    run_all(batch)
    services.batch_deliver(job_id=str(job_of(batch).id))
    assert "completed" in staff.get("/admin/batches/openaibatch/").content.decode()
    assert staff.get("/admin/batches/openaibatch/add/").status_code == 403
    assert OpenAIBatch.objects.get(pk=batch["id"]).finalized_at is not None


def test_a_retried_job_delivers_its_destinations_again(owner: TenantFixture, queued: list[Any], deliveries_queued: list[str], tmp_path: Any) -> None:
    from pipeline.config import set_config
    from tests.batches.test_batch_services import with_batch

    original = get_config()
    set_config(with_batch(output_dir=str(tmp_path)))
    try:
        prompts = [Prompt("a", "a"), Prompt("b", "b")]
        job = batch_create(
            tenant=owner.tenant, data={"prompts": prompts, "worker": "echo", "destinations": [{"kind": "file", "path": "out.jsonl"}]}, config=get_config()
        )
        batch_run_chunk(job_id=str(job.id), first=0, last=1)
        BatchItem.objects.filter(job=job, index=1).update(
            status=BatchItem.Status.FAILED, output="", error={"code": "worker_timeout", "message": "late", "data": {}}
        )
        BatchJob.objects.filter(pk=job.pk).update(items_done=1, items_failed=1)
        services.batch_deliver(job_id=str(job.id))
        assert [json.loads(row)["status"] for row in (tmp_path / "out.jsonl").read_text().splitlines()] == ["done", "failed"]
        assert batch_retry_failed(job_id=job.id) == 1 and job.deliveries.get().state == "pending"
        batch_run_chunk(job_id=str(job.id), first=0, last=1)
        services.batch_deliver(job_id=str(job.id))
        assert [json.loads(row)["status"] for row in (tmp_path / "out.jsonl").read_text().splitlines()] == ["done", "done"]
        assert job.deliveries.get().state == "delivered"
    finally:
        set_config(original)
