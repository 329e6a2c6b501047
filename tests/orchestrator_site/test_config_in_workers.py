"""Every process of a prefork batch worker follows the config: the parent, which
reads it at start, and each child, which follows activations with a thread of its
own (threads do not survive the fork)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from pipeline.config.versions import version_activate, version_create
from pipeline.models import ConfigSource, PipelineConfigVersion
from tests.conftest import process_env, start_celery_worker, stop_process
from tests.pipeline.test_config_hot_reload import config_versions

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def reported(metrics_dir: Path) -> dict[str, tuple[str, int]]:
    """pid → (process, version), from the worker's multiprocess metric files."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))
    return {pid: (process, version) for (process, pid), version in config_versions(generate_latest(registry).decode()).items()}


def test_a_prefork_worker_and_each_child_follow_activations(tmp_path: Path) -> None:
    config = tmp_path / "pipeline.toml"
    config.write_text(Path(os.environ["PIPELINE_CONFIG"]).read_text(encoding="utf-8"), encoding="utf-8")
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    name = f"pf{uuid.uuid4().hex[:8]}"
    env = {
        "PIPELINE_CONFIG": str(config),
        "REDIS_KEY_PREFIX": name,
        "CELERY_BROKER_KEY_PREFIX": f"{name}:",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "PIPELINE_CONFIG_CHECK_S": "30",
    }
    scope = process_env(env)["PIPELINE_CONFIG_SCOPE"]
    worker = start_celery_worker("batch.low", f"{name}@localhost", tmp_path / "worker.log", env, concurrency=2, extra_args=("-P", "prefork"))
    try:
        first = PipelineConfigVersion.objects.get(scope=scope, is_active=True)
        assert reported(metrics_dir)[str(worker.pid)] == ("worker-batch", first.id)
        from django.test import override_settings

        with override_settings(PIPELINE_CONFIG_SCOPE=scope):
            newer = version_activate(version_id=version_create(text=config.read_text() + "\n[rag]\ntop_k = 4\n", source=ConfigSource.CLI).id, by="t")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            on_newer = [pid for pid, (_, version) in reported(metrics_dir).items() if version == newer.id]
            if len(on_newer) >= 3:
                break
            time.sleep(0.05)
    finally:
        stop_process(worker)
    assert str(worker.pid) in on_newer and len(on_newer) == 3  # the parent and its two children
