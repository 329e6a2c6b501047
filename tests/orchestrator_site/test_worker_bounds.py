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
