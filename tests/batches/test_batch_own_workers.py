"""Batch jobs through batch workers of their own test, with no other batch worker
consuming: one killed mid-job and replaced, one whose provider is down at first, and
a 10,000-item job whose every process (gateway, batch worker, scheduler) is killed
and started again, its file and S3 destinations holding each item once."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from django.utils import timezone

from batches.models import BatchItem, BatchJob
from batches.services import batch_recover
from orchestrator_site.celery import app
from pipeline.config import get_config
from tests.batches.conftest import S3
from tests.batches.test_batch_worker import LEASE_S, config_with, start_batch_worker, submit, wait_for
from tests.conftest import ROOT, Fakes, TenantFixture, WorkerProcess, process_env, start_gateway, stop_process


def only_consumer(worker: WorkerProcess) -> None:
    """The test's worker is the only one on the batch queues (another would take its chunks)."""
    replies = app.control.inspect(timeout=2).active_queues() or {}
    consumers = {node for node, queues in replies.items() if any(q["name"].startswith("batch.") for q in queues)}
    assert len(consumers) == 1, f"other batch workers are running: {consumers}"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.django_db(transaction=True)
def test_a_job_survives_its_worker_being_killed(owner: TenantFixture, fakes: Fakes, tmp_path: Path) -> None:
    fakes.openai.token_delay_s = 0.02  # about 100 ms an item: the kill lands mid-job
    calls = len(fakes.openai.requests)
    config = config_with(tmp_path, lease_s=LEASE_S)  # leases that run out within the test
    first = start_batch_worker(tmp_path, "doomed", config=config)
    only_consumer(first)
    resp = owner.client.post("/api/v1/batch", {"prompts": [f"item {i}" for i in range(150)], "worker": "openai"}, format="json")
    assert resp.status_code == 201, resp.content
    job_id = resp.json()["id"]
    deadline = time.monotonic() + 60
    while BatchJob.objects.get(pk=job_id).items_done < 20:
        assert time.monotonic() < deadline, "the first worker made no progress"
        time.sleep(0.05)
    first.proc.kill()  # SIGKILL: no warm shutdown, its messages stay unacknowledged
    first.proc.wait(timeout=10)
    stalled = BatchJob.objects.get(pk=job_id)
    assert stalled.status == "running" and stalled.items_done < 150

    time.sleep(LEASE_S + 0.5)  # the dead worker's items are free again
    second = start_batch_worker(tmp_path, "rescuer", config=config)
    try:
        only_consumer(second)
        # The scheduler's sweep, as it runs once the job has stood still for stall_after_s.
        assert batch_recover(now=timezone.now() + dt.timedelta(seconds=get_config().batch.stall_after_s + 1)) > 0
        job = wait_for(job_id, owner, 120)
    finally:
        stop_process(second.proc)
    assert job["counts"] == {"total": 150, "done": 150, "failed": 0, "expired": 0, "pending": 0, "cancelled": 0}
    items = list(BatchItem.objects.filter(job_id=job_id).order_by("index"))
    assert all(item.status == "done" and item.output == "Hello, world!" for item in items)
    # Only the items the dead worker held when it died (a claimed group per thread) were
    # claimed twice, and each of those once more at most, alone.
    held = 4 * get_config().batch.claim_group
    assert sum(item.attempts > 1 for item in items) <= held and max(item.attempts for item in items) == 2
    assert len(fakes.openai.requests) - calls <= 150 + held


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.django_db(transaction=True)
def test_items_whose_provider_was_down_are_run_again_through_the_broker(owner: TenantFixture, fakes: Fakes, tmp_path: Path, clean_breakers: None) -> None:
    fakes.openai.fail_times, fakes.openai.fail_mode = 3, "503"  # the first three calls fail, then the provider is back
    worker = start_batch_worker(tmp_path, "patient", concurrency=1, config=config_with(tmp_path, retry_delay_s=0.3, max_attempts=5))
    try:
        only_consumer(worker)
        job_id = submit(owner, {"prompts": ["a", "b", "c"], "worker": "openai"})
        job = wait_for(job_id, owner, 60)
    finally:
        stop_process(worker.proc)
    assert job["counts"] == {"total": 3, "done": 3, "failed": 0, "expired": 0, "pending": 0, "cancelled": 0}
    first = BatchItem.objects.get(job_id=job_id, index=0)
    assert first.attempts == 4 and first.output == "Hello, world!"  # three deferrals, each a chunk queued again with a countdown


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.django_db(transaction=True)
def test_an_openai_batch_survives_its_worker_being_killed_with_each_line_once(owner: TenantFixture, fakes: Fakes, tmp_path: Path) -> None:
    from django.core.files.uploadedfile import SimpleUploadedFile

    from tests.batches.test_openai_batches import content, jsonl, line

    fakes.openai.token_delay_s = 0.02  # about 100 ms an item: the kill lands mid-batch
    config = config_with(tmp_path, lease_s=LEASE_S)
    first = start_batch_worker(tmp_path, "doomed-openai", config=config)
    only_consumer(first)
    text = "\n".join(line(f"req-{i}", f"item {i}") for i in range(120))
    file_id = owner.client.post("/v1/files", {"file": SimpleUploadedFile("in.jsonl", text.encode()), "purpose": "batch"}, format="multipart").json()["id"]
    batch = owner.client.post("/v1/batches", {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}, format="json").json()
    job_id = BatchJob.objects.get(openai__id=batch["id"]).pk
    deadline = time.monotonic() + 60
    while BatchJob.objects.get(pk=job_id).items_done < 20:
        assert time.monotonic() < deadline, "the first worker made no progress"
        time.sleep(0.05)
    first.proc.kill()
    first.proc.wait(timeout=10)
    time.sleep(LEASE_S + 0.5)
    second = start_batch_worker(tmp_path, "rescuer-openai", config=config)
    try:
        only_consumer(second)
        assert batch_recover(now=timezone.now() + dt.timedelta(seconds=get_config().batch.stall_after_s + 1)) > 0
        deadline = time.monotonic() + 120
        while (done := owner.client.get(f"/v1/batches/{batch['id']}").json())["status"] != "completed":
            assert time.monotonic() < deadline, done
            time.sleep(0.3)
    finally:
        stop_process(second.proc)
    assert done["request_counts"] == {"total": 120, "completed": 120, "failed": 0} and done["error_file_id"] is None
    rows = jsonl(content(owner, done["output_file_id"]))
    assert [row["custom_id"] for row in rows] == [f"req-{i}" for i in range(120)]  # each line once, in the file's order
    assert {row["response"]["body"]["choices"][0]["message"]["content"] for row in rows} == {"Hello, world!"}


def start_beat(tmp_path: Path, name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The scheduler, as ``make run`` starts it, with a schedule file of its own."""
    command = [sys.executable, "-m", "celery", "-A", "orchestrator_site", "--quiet", "beat", "-s", str(tmp_path / "celerybeat-schedule")]
    with (tmp_path / f"{name}.log").open("ab") as log:
        return subprocess.Popen([*command, "--loglevel", "WARNING"], cwd=ROOT, env=process_env(env), stdout=log, stderr=subprocess.STDOUT)


def kill(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        proc.kill()  # SIGKILL: nothing finishes, nothing is acknowledged or cleaned up
    for proc in procs:
        proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.django_db(transaction=True)
def test_every_process_killed_mid_job_then_restarted_each_destination_holds_each_item_once(owner: TenantFixture, tmp_path: Path, s3: S3) -> None:
    out = tmp_path / "out"
    config = config_with(tmp_path, lease_s=LEASE_S, stall_after_s=2, output_dir=str(out), webhook_allow=["127.0.0.1/32"])
    # Metrics of their own: the files of processes killed with SIGKILL stay behind, and
    # in the suite's shared directory they would show in other tests' scrapes.
    (tmp_path / "metrics").mkdir()
    env = {"PIPELINE_CONFIG": str(config), "BATCH_RECOVERY_INTERVAL_S": "1", "LOG_LEVEL": "WARNING", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    gateway, url = start_gateway(tmp_path / "gateway.log", env)
    worker = start_batch_worker(tmp_path, "node-a", config=config, measured=False)  # its scale is the test: outside coverage
    beat = start_beat(tmp_path, "beat-a", env)
    only_consumer(worker)
    auth = {"Authorization": f"Bearer {owner.key}"}
    prompts = [{"prompt": f"prompt number {i}", "custom_id": f"p{i}"} for i in range(10_000)]
    places = [{"kind": "file", "path": "night/run.jsonl"}, {"kind": "s3", "bucket": s3.bucket, "prefix": "night/", "endpoint_url": s3.endpoint_url}]
    resp = httpx.post(f"{url}/api/v1/batch", json={"prompts": prompts, "destinations": places}, headers=auth, timeout=60)
    assert resp.status_code == 201, resp.text
    job_id = resp.json()["id"]
    deadline = time.monotonic() + 120
    while BatchJob.objects.get(pk=job_id).items_done < 1500:
        assert time.monotonic() < deadline, "no progress before the kill"
        time.sleep(0.05)
    kill(gateway, worker.proc, beat)
    stalled = BatchJob.objects.get(pk=job_id)
    assert stalled.status == "running" and 1500 <= stalled.items_done < 10_000

    time.sleep(LEASE_S + 0.5)  # the dead worker's leases run out, as they would
    gateway, url = start_gateway(tmp_path / "gateway.log", env)
    worker = start_batch_worker(tmp_path, "node-a-again", config=config, measured=False)
    beat = start_beat(tmp_path, "beat-a-again", env)
    try:
        only_consumer(worker)
        deadline = time.monotonic() + 300  # the sweep on the restarted scheduler queues what was left
        while (job := httpx.get(f"{url}/api/v1/batch/{job_id}", headers=auth, timeout=10).json())["status"] != "completed" or any(
            d["state"] != "delivered" for d in job["destinations"]
        ):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
    finally:
        for proc in (gateway, worker.proc, beat):
            stop_process(proc)
    assert job["counts"]["done"] == 10_000 and [d["lines"] for d in job["destinations"]] == [10_000, 10_000]
    written = (out / "night" / "run.jsonl").read_bytes()
    assert s3.body(f"night/{job_id}.jsonl") == written  # the same lines in both
    rows = [json.loads(line) for line in written.splitlines()]
    assert [row["index"] for row in rows] == list(range(10_000))  # every item once, in order
    assert all(row["status"] == "done" and row["custom_id"] == f"p{row['index']}" and row["text"].startswith(f"prompt number {row['index']}") for row in rows)
