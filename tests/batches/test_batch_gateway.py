"""A batch job through a real gateway process (uvicorn, as ``make run`` starts it)
whose broker is down when the job arrives: the job is kept, the scheduler's sweep
queues it once a broker answers, and the answers stream back over HTTP."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import httpx
import pytest
from django.utils import timezone

from batches.models import BatchJob
from batches.services import batch_recover
from pipeline.config import get_config
from tests.batches.test_batch_worker import batch_worker  # noqa: F401 - the module's batch worker
from tests.conftest import TenantFixture, free_port, start_gateway, stop_process


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("batch_worker")
def test_a_job_taken_while_the_broker_is_down_runs_once_the_sweep_finds_it(owner: TenantFixture, tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    gateway, url = start_gateway(log, {"CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0", "LOG_FORMAT": "json", "LOG_LEVEL": "INFO"})
    auth = {"Authorization": f"Bearer {owner.key}"}
    try:
        prompts = [{"prompt": f"question {i}", "custom_id": f"q{i}"} for i in range(1200)]  # two pages of the results stream (1,000 rows a page)
        resp = httpx.post(f"{url}/api/v1/batch", json={"prompts": prompts}, headers=auth, timeout=60)
        assert resp.status_code == 201, resp.text  # accepted: the job is in Postgres, whatever the broker does
        job_id = resp.json()["id"]
        events = [json.loads(line).get("event") for line in log.read_text().splitlines() if line.startswith("{")]
        assert "batch_enqueue_failed" in events
        time.sleep(1.0)
        assert BatchJob.objects.get(pk=job_id).status == "queued"  # nothing reached a worker

        # The sweep, with a broker that answers (this process's), once the job has stood still long enough.
        assert batch_recover(now=timezone.now() + dt.timedelta(seconds=get_config().batch.stall_after_s + 1)) == 48  # chunks of 25
        deadline = time.monotonic() + 120
        while (job := httpx.get(f"{url}/api/v1/batch/{job_id}", headers=auth, timeout=10).json())["status"] != "completed":
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["counts"]["done"] == 1200 and job["progress"] == 1.0

        with httpx.stream("GET", f"{url}/api/v1/batch/{job_id}/results", headers=auth, timeout=30) as stream:
            assert stream.status_code == 200 and stream.headers["content-type"] == "application/x-ndjson"
            assert "content-length" not in stream.headers  # streamed, a page of rows at a time
            rows = [json.loads(line) for line in stream.iter_lines() if line]
        assert [r["index"] for r in rows] == list(range(1200)) and [r["custom_id"] for r in rows[:2]] == ["q0", "q1"]
        assert all(r["text"].startswith(f"question {r['index']}") for r in rows)
        tail = httpx.get(f"{url}/api/v1/batch/{job_id}/results", params={"after": 1099}, headers=auth, timeout=30)
        assert [json.loads(line)["index"] for line in tail.text.splitlines()] == list(range(1100, 1200))
    finally:
        stop_process(gateway)
