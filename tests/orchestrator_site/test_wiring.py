"""How the project is wired: apps, the current Celery app, URLs, REST defaults, invariants between settings."""

from __future__ import annotations

import subprocess
import sys

from celery import current_app
from django.conf import settings
from django.urls import resolve, reverse

from orchestrator_site.celery import app
from pipeline.tasks import run_realtime
from tests.conftest import ROOT


def test_the_django_process_sends_through_our_celery_app() -> None:
    assert current_app.main == app.main == "orchestrator_site"
    assert run_realtime.app is app


def test_visibility_timeout_outlasts_every_task_time_limit() -> None:
    # A late-acked task is redelivered after visibility_timeout: shorter than a task's
    # hard limit, and a slow task would run twice.
    visibility = settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"]
    for task in app.tasks.values():
        if task.name.startswith(("pipeline.", "batches.")):
            assert (task.time_limit or 0) < visibility, task.name


def test_publishers_fail_fast_when_the_broker_is_down() -> None:
    options = settings.CELERY_BROKER_TRANSPORT_OPTIONS
    assert options["max_retries"] == 1 and options["interval_max"] <= 1


def test_flower_gets_task_events_from_workers_and_no_sent_events() -> None:
    # A second broker publish per task in the gateway; queue depth is a metric instead.
    assert app.conf.worker_send_task_events and not app.conf.task_send_sent_event


def test_named_urls() -> None:
    assert reverse("infer") == "/api/v1/infer"
    assert reverse("request-status", args=["abc"]) == "/api/v1/status/abc"
    assert reverse("request-result", args=["abc"]) == "/api/v1/result/abc"
    assert reverse("documents") == "/api/v1/documents"
    assert reverse("document-detail", args=["d"]) == "/api/v1/documents/d"
    assert reverse("health") == "/health" and reverse("schema") == "/api/v1/schema/" and reverse("docs") == "/api/v1/docs/"
    assert resolve("/api/v2/anything").func.__name__ == "not_found_view"


def test_rest_defaults_accept_only_json_and_bearer_keys() -> None:
    rest = settings.REST_FRAMEWORK
    assert rest["DEFAULT_PARSER_CLASSES"] == ["rest_framework.parsers.JSONParser"]
    assert rest["DEFAULT_RENDERER_CLASSES"] == ["rest_framework.renderers.JSONRenderer"]
    assert rest["DEFAULT_AUTHENTICATION_CLASSES"] == ["pipeline.auth.ApiKeyAuthentication"]
    assert rest["EXCEPTION_HANDLER"] == "pipeline.api.errors.exception_handler"


def test_apps_in_dependency_order() -> None:
    apps = settings.INSTALLED_APPS
    assert apps[0] == "daphne"  # its runserver replaces Django's
    assert apps.index("pipeline") < apps.index("batches")


def test_database_is_pooled_not_persistent() -> None:
    from django.db import connections
    from django.db.backends.postgresql.base import DatabaseWrapper as DjangosPostgres

    db = settings.DATABASES["default"]
    # Django's PostgreSQL backend, with the django_db_* metrics (orchestrator_site.db.postgresql).
    assert db["ENGINE"] == "orchestrator_site.db.postgresql" and isinstance(connections["default"], DjangosPostgres) and db["CONN_MAX_AGE"] == 0
    assert db["OPTIONS"]["pool"]["max_size"] >= db["OPTIONS"]["pool"]["min_size"] >= 1


def test_manage_py_runs() -> None:
    proc = subprocess.run([sys.executable, "manage.py", "help", "create_tenant"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--reuse" in proc.stdout
