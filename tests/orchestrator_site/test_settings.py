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


def settings_json(**env: str) -> dict:
    import json

    code = (
        "import json; from orchestrator_site import settings as s; "
        "print(json.dumps({k: getattr(s, k, None) for k in ['DEBUG', 'SECURE_SSL_REDIRECT', 'SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', "
        "'SECURE_HSTS_SECONDS', 'SERVE_STATIC', 'LOG_FORMAT', 'REDIS_SOCKET_TIMEOUT_S', 'REDIS_KEY_PREFIX', 'PIPELINE_CONFIG_PATH', 'CSRF_TRUSTED_ORIGINS', "
        "'REDIS_MAX_CONNECTIONS']} "
        "| {'conn_max_age': s.DATABASES['default']['CONN_MAX_AGE'], 'pool': s.DATABASES['default']['OPTIONS']['pool'], 'password': s.DATABASES['default']['PASSWORD']}))"
    )
    proc = run_python(code, **env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_production_turns_on_the_secure_defaults() -> None:
    prod = settings_json(ORCHESTRATOR_ENV="production", DJANGO_SECRET_KEY="k" * 60)
    assert prod["DEBUG"] is False and prod["SECURE_SSL_REDIRECT"] is True
    assert prod["SESSION_COOKIE_SECURE"] and prod["CSRF_COOKIE_SECURE"] and prod["SECURE_HSTS_SECONDS"] == 31536000
    assert prod["SERVE_STATIC"] is False and prod["LOG_FORMAT"] == "json"


def test_development_defaults() -> None:
    dev = settings_json()
    assert dev["DEBUG"] is True and dev["SERVE_STATIC"] is True and dev["LOG_FORMAT"] == "console"
    assert dev["SECURE_SSL_REDIRECT"] is None and dev["SECURE_HSTS_SECONDS"] is None


def test_tuning_variables() -> None:
    tuned = settings_json(
        DATABASE_POOL_MIN="2",
        DATABASE_POOL_MAX="7",
        REDIS_SOCKET_TIMEOUT_MS="250",
        REDIS_MAX_CONNECTIONS="64",
        REDIS_KEY_PREFIX="blue",
        PIPELINE_CONFIG="/etc/po/pipeline.toml",
        CSRF_TRUSTED_ORIGINS="https://a.example,https://b.example",
        DATABASE_URL="postgres://u:s3cret@h/db",
        LOG_FORMAT="json",
        SERVE_STATIC="0",
    )
    assert tuned["conn_max_age"] == 0 and tuned["pool"] == {"min_size": 2, "max_size": 7, "timeout": 10}
    assert tuned["REDIS_SOCKET_TIMEOUT_S"] == 0.25 and tuned["REDIS_KEY_PREFIX"] == "blue" and tuned["REDIS_MAX_CONNECTIONS"] == 64
    assert tuned["PIPELINE_CONFIG_PATH"] == "/etc/po/pipeline.toml" and tuned["CSRF_TRUSTED_ORIGINS"] == ["https://a.example", "https://b.example"]
    assert tuned["password"] == "s3cret" and tuned["LOG_FORMAT"] == "json" and tuned["SERVE_STATIC"] is False


def test_bad_variables_fail_at_startup_with_the_variable_named() -> None:
    for env, name in [
        ({"DJANGO_DEBUG": "perhaps"}, "DJANGO_DEBUG"),
        ({"DATABASE_POOL_MAX": "soon"}, "DATABASE_POOL_MAX"),
        ({"DATABASE_URL": "sqlite:///x"}, "DATABASE_URL"),
    ]:
        proc = run_python("import orchestrator_site.settings", **env)
        assert proc.returncode != 0 and name in proc.stderr, (env, proc.stderr[-500:])


def test_docs_are_served_from_the_sidecar_not_a_cdn() -> None:
    from django.conf import settings

    spectacular = settings.SPECTACULAR_SETTINGS
    assert spectacular["SWAGGER_UI_DIST"] == "SIDECAR" and spectacular["REDOC_DIST"] == "SIDECAR"
    assert spectacular["SERVE_AUTHENTICATION"] == [] and spectacular["SERVE_INCLUDE_SCHEMA"] is False


def test_time_is_utc_and_aware() -> None:
    from django.conf import settings

    assert settings.TIME_ZONE == "UTC" and settings.USE_TZ is True and settings.CELERY_TIMEZONE == "UTC"


def test_log_level_is_case_insensitive() -> None:
    proc = run_python("import logging, orchestrator_site.settings; print(logging.getLogger().level)", LOG_LEVEL="debug")
    assert proc.returncode == 0 and proc.stdout.strip() == "10"
