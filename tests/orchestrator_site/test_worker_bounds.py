"""A worker's concurrency comes from ``[queues]`` in pipeline.toml, by the queues it
consumes, unless its command line gives ``-c``: real workers, asked by ``celery inspect``."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.conftest import _control_app, start_celery_worker, stop_process

pytestmark = pytest.mark.slow


def test_worker_concurrency_follows_the_config_unless_given(tmp_path: Path) -> None:
    config = tmp_path / "pipeline.toml"
    config.write_text("[queues]\nrealtime_concurrency = 3\nbatch_concurrency = 5\n", encoding="utf-8")
    prefix = f"bounds{uuid.uuid4().hex[:8]}"
    env = {"PIPELINE_CONFIG": str(config), "REDIS_KEY_PREFIX": prefix, "CELERY_BROKER_KEY_PREFIX": f"{prefix}:"}
    started = {
        "rt@bounds": start_celery_worker("realtime", "rt@bounds", tmp_path / "rt.log", env, concurrency=None),
        "batch@bounds": start_celery_worker("batch.low,batch.default", "batch@bounds", tmp_path / "batch.log", env, concurrency=None),
        "given@bounds": start_celery_worker("realtime", "given@bounds", tmp_path / "given.log", env, concurrency=2),
    }
    try:
        stats = _control_app({**os.environ, **env}).control.inspect(destination=list(started), timeout=3).stats() or {}
        pools = {node: stats[node]["pool"]["max-concurrency"] for node in started if node in stats}
    finally:
        for proc in started.values():
            stop_process(proc)
    assert pools == {"rt@bounds": 3, "batch@bounds": 5, "given@bounds": 2}


def test_the_start_up_banner_lists_the_queues_the_worker_consumes(tmp_path: Path) -> None:
    import re
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT, process_env

    prefix = f"banner{uuid.uuid4().hex[:8]}"
    env = process_env({"REDIS_KEY_PREFIX": prefix, "CELERY_BROKER_KEY_PREFIX": f"{prefix}:", "PIPELINE_CONFIG_FOLLOW": "0"})
    log = tmp_path / "worker.log"
    cmd = [sys.executable, "-m", "celery", "-A", "orchestrator_site", "worker", "-Q", "batch.high,batch.low", "-P", "threads", "-c", "1", "-n", f"{prefix}@x"]
    with log.open("wb") as out:
        proc = subprocess.Popen([*cmd, "--without-gossip", "--without-mingle"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "[queues]" not in log.read_text() or not re.search(r"\[queues\]\n(\s+\.> \S+.*\n)+\s*\n", log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
    finally:
        stop_process(proc)
    section = log.read_text().split("[queues]", 1)[1]
    assert re.findall(r"\.> (\S+)\s+exchange=", section) == ["batch.high", "batch.low"]
