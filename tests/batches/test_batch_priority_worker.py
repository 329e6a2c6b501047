"""Strict priority through a real batch worker process and the real broker: a small
``high`` job submitted behind thousands of ``low`` items finishes before 1 % of the
low items still queued at its submission have run."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from batches.models import BatchItem, BatchJob
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
        owner.client.post(f"/api/v1/batch/{low_id}/cancel")

    still_queued = 5_000 - at_submission
    ran_meanwhile = at_high_done - at_submission
    assert ran_meanwhile < 0.01 * still_queued, f"{ran_meanwhile} low items ran while the high job did ({still_queued} queued at its submission)"
    assert done(high_id) == 25
