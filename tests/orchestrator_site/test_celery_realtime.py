"""Real-time tasks are Celery's own: its publish, its consumer, its worker state.
``celery inspect`` sees a running one, a revoked one never runs (on a worker
started after the revoke too), and Flower lists them from their task events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster import Cluster, SseReader, start_cluster
from tests.conftest import ROOT, Fakes, TenantFixture, free_port, stop_process

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

TASK = "pipeline.tasks.run_realtime"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, session_fakes: Fakes, django_db_setup: None) -> Iterator[Cluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("celery"), limits={}, workers=1)
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster(platform: Cluster, fakes: Fakes) -> Cluster:
    return platform


def queued(cluster: Cluster, tenant: TenantFixture) -> str:
    """A request recorded as the gateway records it, not yet published."""
    request_id = uuid.uuid4().hex
    payload = {
        "request_id": request_id,
        "tenant_id": str(tenant.tenant.id),
        "session_id": request_id,
        "prompt": "hi",
        "worker": "echo",
        "model": "echo-1",
        "max_tokens": 8,
    }
    cluster.bus.set_record(
        request_id,
        tenant_id=str(tenant.tenant.id),
        session_id=request_id,
        status="queued",
        attempt="1",
        owner="",
        payload=json.dumps(payload),
        deadline_at=f"{time.time() + 60:.6f}",
    )
    return request_id


def publish(cluster: Cluster, request_id: str) -> None:
    cluster.control.send_task(TASK, args=(request_id, 1), task_id=request_id, queue="realtime", routing_key="realtime", exchange="orchestrator")


def test_inspect_lists_a_running_realtime_task(cluster: Cluster, owner: TenantFixture, fakes: Fakes) -> None:
    fakes.openai.mode, fakes.openai.hang_s = "hang", 3
    stream = SseReader(cluster, owner.key, {"prompt": "inspect me", "worker": "openai"})
    _, start = stream.wait_for("start")
    cluster.pid_running(start["request_id"])
    deadline = time.monotonic() + 10
    while fakes.openai.in_flight == 0:  # the task is inside its provider call
        assert time.monotonic() < deadline, "the task never called the provider"
        time.sleep(0.01)
    active = cluster.control.control.inspect(destination=list(cluster.workers), timeout=2).active() or {}
    running = [task for tasks in active.values() for task in tasks]
    assert [(t["name"], t["id"], t["args"]) for t in running] == [(TASK, start["request_id"], [start["request_id"], 1])]
    # The task ends before the test does: a worker still inside it would hold rows
    # that the next test's flush has to lock.
    fakes.openai.mode = "ok"  # its retry, once the hang ends
    stream.finish()
    cluster.wait_for(start["request_id"], lambda r: r.get("status") in {"completed", "failed"}, timeout_s=30)


def test_a_revoked_task_never_runs_and_its_request_fails(cluster: Cluster, owner: TenantFixture) -> None:
    request_id = queued(cluster, owner)
    cluster.control.control.revoke(request_id)
    time.sleep(0.5)  # the broadcast reaches the worker
    publish(cluster, request_id)
    record = cluster.wait_for(request_id, lambda r: r.get("status") == "failed")
    assert "runs" not in record  # never begun
    (error,) = cluster.bus.read_all(request_id)
    assert error.type == "error" and error.data["code"] == "request_cancelled"


def test_a_revoke_outlives_a_worker_restart(cluster: Cluster, owner: TenantFixture, tmp_path: Path) -> None:
    """The worker keeps its revokes in its state file (``--statedb``): started again
    after the revoke, with the message still queued, it drops it."""
    statedb = str(tmp_path / "worker.state")
    for proc in cluster.workers.values():
        stop_process(proc)
    cluster.workers.clear()
    cluster.start_worker("keeper", extra=("--statedb", statedb))
    request_id = queued(cluster, owner)
    cluster.control.control.revoke(request_id)
    time.sleep(0.5)
    for proc in cluster.workers.values():
        stop_process(proc)  # a warm shutdown writes the state file
    cluster.workers.clear()
    publish(cluster, request_id)  # queued while no worker runs
    cluster.start_worker("keeper", extra=("--statedb", statedb))
    record = cluster.wait_for(request_id, lambda r: r.get("status") == "failed")
    assert "runs" not in record
    for proc in cluster.workers.values():
        stop_process(proc)
    cluster.workers.clear()
    cluster.keep_workers(1)


def test_flower_lists_realtime_tasks(cluster: Cluster, owner: TenantFixture, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, **cluster.env, "FLOWER_UNAUTHENTICATED_API": "true"}
    cmd = [sys.executable, "-m", "celery", "-A", "orchestrator_site", "flower", "--address=127.0.0.1", f"--port={port}"]
    with (tmp_path / "flower.log").open("wb") as log:
        flower = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/api/tasks", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, (tmp_path / "flower.log").read_text()[-2000:]
                time.sleep(0.2)

        def flower_sees(prompt: str, wait_s: float) -> dict[str, object] | None:
            resp = httpx.post(f"{cluster.gateway_url}/api/v1/infer", json={"prompt": prompt}, headers={"Authorization": f"Bearer {owner.key}"}, timeout=30)
            request_id = resp.json()["request_id"]
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                task = httpx.get(f"http://127.0.0.1:{port}/api/tasks", timeout=5).json().get(request_id)
                if task and task.get("state") == "SUCCESS":
                    return {**task, "request_id": request_id}
                time.sleep(0.2)
            return None

        # Flower's API answers before its event receiver has joined, and a task that ran
        # before it joined is never seen: new tasks until one is, which shows the receiver
        # is there for every event of the next one (seen once: a single first task ran
        # before the receiver joined, and the test waited on it in vain).
        deadline = time.monotonic() + 60
        attempt = 0
        while flower_sees(f"flower is listening {attempt}", wait_s=3) is None:
            assert time.monotonic() < deadline, (tmp_path / "flower.log").read_text()[-2000:]
            attempt += 1
        task = flower_sees("seen by flower", wait_s=15)
        assert task is not None
        assert task["name"] == TASK and task["args"] == f"('{task['request_id']}', 1)"
    finally:
        stop_process(flower)
