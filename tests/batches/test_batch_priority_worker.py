"""Through a real batch worker process and the real broker: strict priority (a small
``high`` job submitted behind thousands of ``low`` items finishes before 1 % of the
low items still queued at its submission have run), and a job's file destination
delivered once it completes, and a job's items expiring at its deadline."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batches.models import BatchItem, BatchJob
from pipeline.config import get_config
from tests.batches.test_batch_api import ndjson
from tests.batches.test_batch_worker import start_batch_worker
from tests.conftest import Fakes, TenantFixture, WorkerProcess, stop_process

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def batch_worker(django_db_setup: None, session_fakes: Fakes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    worker = start_batch_worker(tmp_path_factory.mktemp("batch-priority"), "batch-priority", concurrency=4)
    yield worker
    stop_process(worker.proc)


def done(job_id: str) -> int:
    return BatchItem.objects.filter(job_id=job_id, status=BatchItem.Status.DONE).count()


def cancel_and_quiesce(tenant: TenantFixture, job_id: str) -> None:
    """Cancel the job, then wait until the worker has nothing running: its queued chunks
    end at once, and a test that ended while they ran would truncate tables under them."""
    from orchestrator_site.celery import app

    tenant.client.post(f"/api/v1/batch/{job_id}/cancel")
    name = f"batch-priority-{os.getpid()}@localhost"
    idle, until = 0, time.monotonic() + 60
    while idle < 3 and time.monotonic() < until:
        active = (app.control.inspect(destination=[name], timeout=1).active() or {}).get(name)
        idle = idle + 1 if active == [] else 0
        time.sleep(0.2)


@pytest.mark.timeout(300)
def test_a_high_job_behind_five_thousand_low_items_finishes_first(owner: TenantFixture, batch_worker: WorkerProcess) -> None:
    low = owner.client.post("/api/v1/batch", {"prompts": [f"low {i}" for i in range(5_000)], "priority": "low"}, format="json")
    assert low.status_code == 201, low.content
    low_id = low.json()["id"]
    try:
        deadline = time.monotonic() + 60
        while done(low_id) < 100:  # the worker is busy with the low job: every thread on it
            assert time.monotonic() < deadline, "the low job never got going"
            time.sleep(0.05)

        at_submission = done(low_id)
        high = owner.client.post("/api/v1/batch", {"prompts": [f"high {i}" for i in range(25)], "priority": "high"}, format="json")
        assert high.status_code == 201, high.content
        high_id = high.json()["id"]
        deadline = time.monotonic() + 60
        while BatchJob.objects.get(pk=high_id).status != BatchJob.Status.COMPLETED:
            assert time.monotonic() < deadline, "the high job did not finish"
            time.sleep(0.02)
        at_high_done = done(low_id)
    finally:
        cancel_and_quiesce(owner, low_id)

    still_queued = 5_000 - at_submission
    ran_meanwhile = at_high_done - at_submission
    assert ran_meanwhile < 0.01 * still_queued, f"{ran_meanwhile} low items ran while the high job did ({still_queued} queued at its submission)"
    assert done(high_id) == 25


@pytest.mark.timeout(120)
def test_a_completed_jobs_file_destination_is_delivered_by_the_worker(owner: TenantFixture, batch_worker: WorkerProcess) -> None:
    target = f"worker/{time.time_ns()}.jsonl"
    made = owner.client.post(
        "/api/v1/batch", {"prompts": [f"deliver {i}" for i in range(60)], "destinations": [{"kind": "file", "path": target}]}, format="json"
    )
    assert made.status_code == 201, made.content
    job_id = made.json()["id"]
    deadline = time.monotonic() + 90
    while (job := owner.client.get(f"/api/v1/batch/{job_id}").json())["destinations"][0]["state"] != "delivered":
        assert time.monotonic() < deadline, f"not delivered: {job}"
        time.sleep(0.1)
    assert job["status"] == "completed" and job["destinations"][0]["lines"] == 60
    written = [json.loads(line) for line in (Path(get_config().batch.output_dir) / target).read_text().splitlines()]
    assert written == ndjson(owner.client.get(f"/api/v1/batch/{job_id}/results"))
    assert [w["index"] for w in written] == list(range(60))


@pytest.mark.timeout(120)
def test_a_job_running_at_its_deadline_ends_with_its_items_expired(owner: TenantFixture, batch_worker: WorkerProcess) -> None:
    """The worker's own check: the items it had not reached at the deadline end expired."""
    deadline = dt.datetime.now(tz=dt.UTC) + dt.timedelta(seconds=2)
    made = owner.client.post("/api/v1/batch", {"prompts": [f"due {i}" for i in range(3_000)], "deadline": deadline.isoformat()}, format="json")
    assert made.status_code == 201, made.content
    job_id = made.json()["id"]
    until = time.monotonic() + 60
    while (job := owner.client.get(f"/api/v1/batch/{job_id}").json())["status"] != "completed":
        assert time.monotonic() < until, f"not completed: {job}"
        time.sleep(0.1)
    counts = job["counts"]
    assert counts["done"] > 0 and counts["expired"] > 0 and counts["done"] + counts["expired"] == 3_000 and counts["failed"] == 0
    finished = BatchItem.objects.filter(job_id=job_id, status=BatchItem.Status.DONE).order_by("-finished_at").first()
    assert finished is not None and finished.finished_at <= deadline + dt.timedelta(seconds=1)  # nothing ran long after it


@pytest.mark.timeout(300)
def test_a_deadline_job_overtakes_an_earlier_job_without_one(owner: TenantFixture, batch_worker: WorkerProcess) -> None:
    earlier = owner.client.post("/api/v1/batch", {"prompts": [f"plain {i}" for i in range(3_000)]}, format="json").json()["id"]
    try:
        until = time.monotonic() + 60
        while done(earlier) < 100:
            assert time.monotonic() < until, "the earlier job never got going"
            time.sleep(0.05)
        at_submission = done(earlier)
        later = {"prompts": [f"due {i}" for i in range(25)], "deadline": (dt.datetime.now(tz=dt.UTC) + dt.timedelta(hours=1)).isoformat()}
        due_id = owner.client.post("/api/v1/batch", later, format="json").json()["id"]
        until = time.monotonic() + 60
        while BatchJob.objects.get(pk=due_id).status != BatchJob.Status.COMPLETED:
            assert time.monotonic() < until, "the deadline job did not finish"
            time.sleep(0.02)
        ran_meanwhile = done(earlier) - at_submission
    finally:
        cancel_and_quiesce(owner, earlier)
    assert ran_meanwhile < 0.01 * (3_000 - at_submission), f"{ran_meanwhile} items of the earlier job ran first"
