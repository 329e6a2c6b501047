"""What the scheduler reads for the scaling signals, from Celery's inspect replies and
the broker; the loop that exports them; and a real ``celery beat`` exporting them on
its metrics port."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from orchestrator_site.scaling import ScalingLoop, loads, read_load
from pipeline.scaling import Load, Signal
from tests.conftest import ROOT, WorkerProcess, free_port, process_env, start_celery_worker, stop_process


def queue(name: str) -> dict[str, str]:
    return {"name": name, "routing_key": name}


def test_loads_count_each_queues_workers_slots_and_work() -> None:
    consumed = {
        "rt1@h": [queue("realtime")],
        "rt2@h": [queue("realtime")],
        "batch@h": [queue("batch.high"), queue("batch.default"), queue("batch.low")],
        "other@h": [queue("somebody-elses")],
    }
    stats = {"rt1@h": {"pool": {"max-concurrency": 32}}, "rt2@h": {"pool": {"max-concurrency": 16}}, "batch@h": {"pool": {"max-concurrency": 2}}}
    active = {"batch@h": [{"delivery_info": {"routing_key": "batch.low"}}, {"delivery_info": {"routing_key": "batch.low"}}], "rt1@h": []}
    depths = {"realtime": 3, "batch.high": 0, "batch.default": 5, "batch.low": 7}
    result = loads(consumed=consumed, stats=stats, active=active, depths=depths, realtime_in_flight=40)
    assert result == {
        "realtime": Load(work=40, workers=2, slots_per_worker=32),  # admitted includes queued: not counted twice
        "batch.high": Load(work=0, workers=1, slots_per_worker=2),
        "batch.default": Load(work=5, workers=1, slots_per_worker=2),
        "batch.low": Load(work=9, workers=1, slots_per_worker=2),
    }


def test_a_queue_nobody_consumes_has_no_capacity() -> None:
    result = loads(consumed={}, stats={}, active={}, depths={"batch.low": 4}, realtime_in_flight=0)
    assert result["batch.low"] == Load(work=4, workers=0, slots_per_worker=0) and result["realtime"].capacity == 0


@pytest.mark.django_db
def test_the_live_realtime_worker_is_read_with_its_concurrency(realtime_worker: WorkerProcess) -> None:
    result = read_load()
    assert result["realtime"].workers >= 1 and result["realtime"].slots_per_worker == 8  # the suite's worker: -c 8
    assert set(result) == {"realtime", "batch.high", "batch.default", "batch.low"}


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_scheduler_exports_the_signals_on_its_metrics_port(tmp_path: Path) -> None:
    name = f"sc{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {"REDIS_KEY_PREFIX": name, "CELERY_BROKER_KEY_PREFIX": f"{name}:", "WORKER_METRICS_PORT": str(port), "SCALING_INTERVAL_S": "1"}
    worker = start_celery_worker("batch.low", f"{name}@localhost", tmp_path / "worker.log", env, concurrency=3)
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "orchestrator_site", "beat", "-s", str(tmp_path / "schedule"), "--loglevel", "WARNING"],
        cwd=ROOT,
        env=process_env(env),
        stdout=(tmp_path / "beat.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        samples: dict[tuple[str, str], float] = {}
        while ("orchestrator_desired_workers", "batch.low") not in samples:
            assert time.monotonic() < deadline, (tmp_path / "beat.log").read_text()[-2000:]
            time.sleep(0.3)
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.TransportError:
                continue
            samples = {(s.name, s.labels.get("queue", "")): s.value for f in text_string_to_metric_families(text) for s in f.samples}
        # One idle worker of 3 slots on batch.low: utilization 0, hold, one worker wanted.
        assert samples[("orchestrator_queue_utilization", "batch.low")] == 0.0
        assert samples[("orchestrator_scaling_signal", "batch.low")] == 0.0
        assert samples[("orchestrator_desired_workers", "batch.low")] == 1.0
        assert samples[("orchestrator_desired_workers", "batch.high")] == 0.0  # nobody consumes it, nothing waits
    finally:
        stop_process(beat)
        stop_process(worker)


SLOTS = 10


def at(utilization: float, workers: int = 4) -> Load:
    return Load(work=round(utilization * workers * SLOTS), workers=workers, slots_per_worker=SLOTS)


def gauge(name: str, queue: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"queue": queue})


def test_the_loop_exports_each_queues_utilization_signal_and_desired_workers() -> None:
    now = [0.0]
    loop = ScalingLoop(lambda: {"q-test": at(0.9), "q-idle": at(0.0, workers=2)}, clock=lambda: now[0])
    loop.tick()
    now[0] = 30.0
    decisions = loop.tick()
    assert decisions["q-test"].signal is Signal.OUT
    assert (gauge("orchestrator_queue_utilization", "q-test"), gauge("orchestrator_scaling_signal", "q-test")) == (0.9, 1.0)
    assert gauge("orchestrator_desired_workers", "q-test") == 8.0 and gauge("orchestrator_desired_workers", "q-idle") == 2.0
    loop = ScalingLoop(lambda: {"q-unserved": Load(work=1, workers=0, slots_per_worker=0)}, clock=lambda: 0.0)
    loop.tick()
    assert gauge("orchestrator_queue_utilization", "q-unserved") == 1e9  # infinite: no worker at all


def test_the_loop_runs_in_a_thread_and_outlives_a_failed_reading() -> None:
    from orchestrator_site.errors import ServiceUnavailable

    readings: list[int] = []
    done = threading.Event()

    def read() -> dict[str, Load]:
        readings.append(1)
        if len(readings) == 1:
            raise ServiceUnavailable("redis down")
        done.set()
        return {"q-thread": at(0.5)}

    loop = ScalingLoop(read, interval_s=0.05)
    with capture_logs() as logs:
        thread = loop.start()
        assert done.wait(5)
        loop.stop()
        thread.join(5)
    assert not thread.is_alive() and len(readings) >= 2
    assert [e["event"] for e in logs if e["event"] == "scaling_unread"] == ["scaling_unread"]
    assert gauge("orchestrator_queue_utilization", "q-thread") == 0.5


@pytest.mark.parametrize("failure", ["redis", "broker", "socket"])
def test_a_reading_that_fails_leaves_the_gauges_as_they_were(failure: str) -> None:
    from kombu.exceptions import OperationalError

    from orchestrator_site.errors import ServiceUnavailable

    errors = {"redis": ServiceUnavailable("redis down"), "broker": OperationalError("broker down"), "socket": ConnectionRefusedError()}
    calls: list[int] = []
    ok = threading.Event()

    def read() -> dict[str, Load]:
        calls.append(1)
        if len(calls) == 2:
            raise errors[failure]
        if len(calls) >= 3:
            ok.set()
        return {f"q-{failure}": at(0.25 * len(calls))}

    loop = ScalingLoop(read, interval_s=0.02)
    loop.tick()
    thread = loop.start()
    assert ok.wait(5)
    loop.stop()
    thread.join(5)
    assert not thread.is_alive() and len(calls) >= 3  # went on after the failure
