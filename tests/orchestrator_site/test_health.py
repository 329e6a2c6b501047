"""GET /health reports Postgres, Redis and the broker, and answers 503 when one is down."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client, override_settings

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.django_db
def test_all_up_is_200_with_each_check() -> None:
    resp = Client().get("/health")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"postgres", "redis", "broker"}
    assert all(c["status"] == "ok" and c["latency_ms"] >= 0 for c in body["checks"].values())


@pytest.mark.django_db
def test_redis_down_is_503() -> None:
    with override_settings(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"):
        resp = Client().get("/health")
    assert resp.status_code == 503
    checks = resp.json()["checks"]
    assert checks["redis"]["status"] == "down" and "Connection" in checks["redis"]["error"]
    assert checks["postgres"]["status"] == "ok"


@pytest.mark.django_db
def test_broker_down_is_503() -> None:
    with override_settings(CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0"):
        resp = Client().get("/health")
    assert resp.status_code == 503
    assert resp.json()["checks"]["broker"]["status"] == "down"


@pytest.mark.django_db
def test_rabbitmq_broker_is_checked_too() -> None:
    with override_settings(CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:5672//"):
        resp = Client().get("/health")
    assert resp.json()["checks"]["broker"]["status"] == "ok"


def test_postgres_down_is_503() -> None:
    # A separate process, so that its database connection points at a closed port.
    code = (
        "import django, json; django.setup(); from django.test import Client; "
        "r = Client().get('/health'); print(r.status_code, json.dumps(r.json()['checks']['postgres']))"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "orchestrator_site.settings", "DATABASE_URL": f"postgres://postgres@127.0.0.1:{free_port()}/x"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("503 ") and '"status": "down"' in proc.stdout


def test_health_needs_no_key_and_only_answers_get() -> None:
    resp = Client().post("/health")
    assert resp.status_code == 405


def test_a_failing_check_reports_its_error_and_others_still_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator_site import health

    def broken() -> None:
        raise OSError("x" * 1000)

    monkeypatch.setitem(health.CHECKS, "redis", (broken, (OSError,)))
    monkeypatch.setitem(health.CHECKS, "postgres", (lambda: None, ()))
    results = health.run_checks()
    assert results["redis"]["status"] == "down" and len(results["redis"]["error"]) == 300 and results["redis"]["error"].startswith("OSError: xxx")
    assert results["postgres"]["status"] == "ok" and results["broker"]["status"] == "ok"


def test_an_unexpected_failure_in_a_check_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator_site import health

    def buggy() -> None:
        raise ZeroDivisionError

    monkeypatch.setitem(health.CHECKS, "postgres", (lambda: None, ()))
    monkeypatch.setitem(health.CHECKS, "redis", (buggy, (OSError,)))
    with pytest.raises(ZeroDivisionError):
        health.run_checks()


@pytest.mark.django_db
def test_each_check_succeeds_on_its_own() -> None:
    from orchestrator_site.health import check_broker, check_postgres, check_redis

    for check in (check_postgres, check_redis, check_broker):
        assert check() is None


def test_rabbitmq_down_is_reported() -> None:
    from orchestrator_site import health

    check, failures = health.CHECKS["broker"]
    with override_settings(CELERY_BROKER_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}//"), pytest.raises(failures):
        check()


@pytest.mark.django_db
def test_health_body_shape_is_stable_for_monitors() -> None:
    body = Client().get("/health").json()
    assert set(body) == {"status", "checks"}
    for check in body["checks"].values():
        assert set(check) == {"status", "latency_ms"} and isinstance(check["latency_ms"], float)


@pytest.mark.django_db
def test_down_body_names_only_the_failed_check() -> None:
    with override_settings(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"):
        body = Client().get("/health").json()
    assert body["status"] == "unavailable"
    assert [name for name, c in body["checks"].items() if c["status"] == "down"] == ["redis"]
    assert set(body["checks"]["redis"]) == {"status", "error"}
