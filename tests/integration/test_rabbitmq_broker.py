"""The broker is configuration: the same real-time path over RabbitMQ (amqp://)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipeline.tokenbus import get_bus
from tests.conftest import ROOT, TenantFixture, _database_url, start_celery_worker, stop_process

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def test_infer_over_rabbitmq(owner: TenantFixture, tmp_path: Path) -> None:
    node_name = f"realtime-amqp-{uuid.uuid4().hex[:6]}@localhost"
    env = {**os.environ, "DATABASE_URL": _database_url(), "CELERY_BROKER_URL": AMQP}
    worker = start_celery_worker("realtime", node_name, tmp_path / "worker.log", {"CELERY_BROKER_URL": AMQP}, concurrency=2)
    try:
        # The gateway side in its own process, so that its Celery app is built for amqp:// from the start.
        code = (
            "import django, json; django.setup(); "
            "from rest_framework.test import APIClient; c = APIClient(); "
            f"c.credentials(HTTP_AUTHORIZATION='Bearer {owner.key}'); "
            "r = c.post('/api/v1/infer', {'prompt': 'over rabbit'}, format='json'); print(r.status_code, json.dumps(r.json()))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**env, "DJANGO_SETTINGS_MODULE": "orchestrator_site.settings"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        stop_process(worker)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status, body = proc.stdout.strip().split(" ", 1)
    result = json.loads(body)
    assert status == "200" and result["text"].startswith("over rabbit") and list(result["timings_us"]) == ["rag", "assemble", "inference", "post", "stream"]
    # Run by the worker, through Celery's consumer on RabbitMQ: not by the gateway's own fallback.
    assert get_bus().get_record(result["request_id"])["executed_by"].endswith(f":{worker.pid}")
