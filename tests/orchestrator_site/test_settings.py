"""Settings come from the environment; production refuses unsafe defaults."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SECRET_KEY", "ORCHESTRATOR_ENV", "DJANGO_DEBUG")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)


def test_production_without_secret_key_refuses_to_start() -> None:
    proc = run_python("import orchestrator_site.settings", ORCHESTRATOR_ENV="production")
    assert proc.returncode != 0
    assert "DJANGO_SECRET_KEY must be set" in proc.stderr


def test_unknown_environment_name_is_rejected() -> None:
    proc = run_python("import orchestrator_site.settings", ORCHESTRATOR_ENV="staging")
    assert proc.returncode != 0 and "ORCHESTRATOR_ENV" in proc.stderr


def test_environment_drives_the_settings() -> None:
    code = (
        "from orchestrator_site import settings as s; "
        "print(s.DATABASES['default']['NAME'], s.DATABASES['default']['PORT'], s.REDIS_URL, s.CELERY_BROKER_URL, s.ALLOWED_HOSTS, s.DEBUG)"
    )
    proc = run_python(
        code,
        DATABASE_URL="postgres://a:b@h:6000/dbx",
        REDIS_URL="redis://r:1/2",
        CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:5672//",
        ALLOWED_HOSTS="api.example.com,x",
        DJANGO_DEBUG="0",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split(" ", 4)[:4] == ["dbx", "6000", "redis://r:1/2", "amqp://guest:guest@127.0.0.1:5672//"]
    assert "['api.example.com', 'x'] False" in proc.stdout


@pytest.mark.slow
def test_check_deploy_is_clean_under_production_settings() -> None:
    proc = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env={**os.environ, "ORCHESTRATOR_ENV": "production", "DJANGO_SECRET_KEY": "x" * 30 + "-unit-test-" + "y" * 30, "ALLOWED_HOSTS": "api.example.com"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no issues" in proc.stdout
