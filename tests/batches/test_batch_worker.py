"""Batch jobs through real ``celery worker -Q batch.high,batch.default,batch.low``
processes and the real broker: a 10,000-prompt job with its progress on the way,
and a job that survives its worker being killed."""

from __future__ import annotations

import os
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from batches.models import BatchItem, BatchJob
from tests.batches.test_batch_api import ndjson
from tests.conftest import Fakes, TenantFixture, WorkerProcess, free_port, start_celery_worker, stop_process
from tests.pipeline.test_metrics_flow import delta, gateway_scrape, value, worker_scrape

QUEUES = "batch.high,batch.default,batch.low"
LEASE_S = 3


def start_batch_worker(tmp: Path, name: str, *, concurrency: int = 4, config: Path | None = None, measured: bool = True) -> WorkerProcess:
    port = free_port()
    metrics_dir = tmp / f"metrics-{name}"
    metrics_dir.mkdir()
    env = {"WORKER_METRICS_PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "LOG_LEVEL": "WARNING"}
    if config is not None:
        env["PIPELINE_CONFIG"] = str(config)
    proc = start_celery_worker(QUEUES, f"{name}-{os.getpid()}@localhost", tmp / f"{name}.log", env, concurrency=concurrency, measured=measured)
    return WorkerProcess(proc, f"http://127.0.0.1:{port}/metrics")


@pytest.fixture(scope="module")
def batch_worker(django_db_setup: None, session_fakes: Fakes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    # Outside coverage: under its tracing the 10,000 items took 180-210 s of the suite's
    # time, about 115 s without it; the workers of test_batch_own_workers and the
    # in-process tests measure the same code.
    worker = start_batch_worker(tmp_path_factory.mktemp("batch"), "batch-test", measured=False)
    yield worker
    stop_process(worker.proc)


def wait_for(job_id: str, tenant: TenantFixture, timeout_s: float, seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = tenant.client.get(f"/api/v1/batch/{job_id}").json()
        if seen is not None:
            seen.append({**job, "scrape": gateway_scrape()})
        if job["status"] == "completed":
            return job
        time.sleep(0.5)
    raise AssertionError(f"job not completed in {timeout_s}s: {tenant.client.get(f'/api/v1/batch/{job_id}').json()}")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.django_db(transaction=True)
def test_ten_thousand_prompts_complete_with_their_progress_reported(owner: TenantFixture, batch_worker: WorkerProcess) -> None:
    before = worker_scrape(batch_worker)
    prompts = [f"prompt number {i}" for i in range(10_000)]
    resp = owner.client.post("/api/v1/batch", {"prompts": prompts, "priority": "low"}, format="json")
    assert resp.status_code == 201, resp.content
    job_id = resp.json()["id"]

    seen: list[dict[str, Any]] = []
    job = wait_for(job_id, owner, 480, seen)
    assert job["counts"] == {"total": 10_000, "done": 10_000, "failed": 0, "expired": 0, "pending": 0, "cancelled": 0} and job["progress"] == 1.0

    # Progress on the way: the API's and the gauges' (read from Postgres at scrape time).
    midway = [s for s in seen if 0 < s["counts"]["done"] < 10_000]
    assert midway, "never saw the job part-way"
    assert all(s["status"] == "running" and s["progress"] == pytest.approx(s["counts"]["done"] / 10_000, abs=1e-6) for s in midway)
    ratios = [value(s["scrape"], "orchestrator_batch_progress_ratio") for s in midway]
    assert any(0 < r < 1 for r in ratios) and ratios == sorted(ratios)  # only this job is active: it only grows
    assert any(value(s["scrape"], "orchestrator_batch_jobs", status="running") == 1 for s in midway)
    assert any(0 < value(s["scrape"], "orchestrator_batch_items_pending") < 10_000 for s in midway)
    final = gateway_scrape()
    assert value(final, "orchestrator_batch_progress_ratio") == 1.0 and value(final, "orchestrator_batch_items_pending") == 0
    assert value(final, "orchestrator_batch_jobs", status="completed") >= 1

    # Every answer, once, in order, through the gateway's results stream.
    rows = ndjson(owner.client.get(f"/api/v1/batch/{job_id}/results"))
    assert [r["index"] for r in rows] == list(range(10_000))
    assert all(r["status"] == "done" and r["text"].startswith(prompts[r["index"]]) for r in rows)
    assert BatchItem.objects.filter(job_id=job_id, attempts=1).count() == 10_000  # no item ran twice

    after = worker_scrape(batch_worker)
    assert value(after, "orchestrator_batch_progress_ratio") == 1.0  # the worker's own port has the gauges too
    assert delta(before, after, "orchestrator_batch_items_total", priority="low", outcome="ok") == 10_000
    assert delta(before, after, "orchestrator_stage_duration_seconds_count", stage="inference", outcome="ok") == 10_000


def config_with(tmp_path: Path, **batch: object) -> Path:
    """The suite's pipeline.toml with other [batch] settings, for a worker of one test."""
    path = tmp_path / "pipeline.toml"
    config = tomllib.loads(Path(os.environ["PIPELINE_CONFIG"]).read_text())
    config["batch"] = {**config.get("batch", {}), **batch}
    path.write_text(tomli_w.dumps(config))
    return path


def submit(tenant: TenantFixture, body: dict[str, Any]) -> str:
    resp = tenant.client.post("/api/v1/batch", body, format="json")
    assert resp.status_code == 201, resp.content
    return str(resp.json()["id"])


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.django_db(transaction=True)
def test_a_high_priority_job_does_not_wait_behind_a_low_one(owner: TenantFixture, batch_worker: WorkerProcess) -> None:
    low = submit(owner, {"prompts": [f"low {i}" for i in range(1000)], "priority": "low"})
    deadline = time.monotonic() + 60
    while BatchJob.objects.get(pk=low).items_done == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    at_high_submitted = BatchJob.objects.get(pk=low).items_done
    high = submit(owner, {"prompts": [f"high {i}" for i in range(25)], "priority": "high"})
    wait_for(high, owner, 120)
    at_high_done = BatchJob.objects.get(pk=low).items_done
    wait_for(low, owner, 240)
    # The high job's one chunk waited only for the chunks the worker was running (it reserves
    # one per slot: worker_prefetch_multiplier = 1), not for the low job's queue.
    assert at_high_done - at_high_submitted <= 300, (at_high_submitted, at_high_done)
    assert BatchJob.objects.get(pk=high).finished_at < BatchJob.objects.get(pk=low).finished_at


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.django_db(transaction=True)
def test_real_time_requests_are_answered_while_a_batch_is_queued(owner: TenantFixture, batch_worker: WorkerProcess, realtime_worker: WorkerProcess) -> None:
    job_id = submit(owner, {"prompts": [f"backlog {i}" for i in range(1500)], "priority": "high"})
    answered = []
    for _ in range(5):
        resp = owner.client.post("/api/v1/infer", {"prompt": "meanwhile, a real-time question"}, format="json")
        assert resp.status_code == 200, resp.content
        answered.append(BatchJob.objects.get(pk=job_id).items_total - BatchJob.objects.get(pk=job_id).items_done)
    assert min(answered) > 0, "the batch finished before the real-time requests: nothing was shown"
    wait_for(job_id, owner, 240)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.django_db(transaction=True)
def test_cancelling_a_running_job_stops_its_items(owner: TenantFixture, batch_worker: WorkerProcess) -> None:
    job_id = submit(owner, {"prompts": [f"to cancel {i}" for i in range(1500)]})
    deadline = time.monotonic() + 60
    while BatchJob.objects.get(pk=job_id).items_done < 50:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert owner.client.post(f"/api/v1/batch/{job_id}/cancel").json()["status"] == "cancelled"
    time.sleep(1.0)  # the items being run when it was cancelled are recorded
    settled = BatchJob.objects.get(pk=job_id).items_done
    time.sleep(1.5)
    job = BatchJob.objects.get(pk=job_id)
    assert job.status == "cancelled" and job.items_done == settled < 1500
    assert BatchItem.objects.filter(job_id=job_id, status="pending", leased_until__isnull=True).count() == 1500 - settled


@pytest.mark.django_db(transaction=True)
def test_concurrent_and_duplicate_runs_record_every_item_once(owner: TenantFixture) -> None:
    from django.db import connections

    from batches.services import batch_run_chunk

    job_id = submit(owner, {"prompts": [f"p{i}" for i in range(120)]})
    ranges = [(0, 59), (60, 119), (0, 59), (60, 119), (0, 119), (0, 119)]  # every item offered to three runs at once

    def run(first: int, last: int) -> None:
        try:
            batch_run_chunk(job_id=job_id, first=first, last=last)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=r) for r in ranges]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    job = BatchJob.objects.get(pk=job_id)
    assert (job.status, job.items_done, job.items_failed) == ("completed", 120, 0)
    assert BatchItem.objects.filter(job_id=job_id, status="done", attempts=1).count() == 120  # claimed once each
