"""Tracing is configured by the environment and costs nothing when off; the gateway
writes one access-log line per request."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import structlog
from asgiref.sync import async_to_sync
from django.test import AsyncClient, Client

from orchestrator_site import telemetry
from orchestrator_site.logging import configure_logging
from tests.conftest import ROOT


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_SDK_DISABLED": "false"}, True),
    ],
)
def test_tracing_is_on_only_with_an_endpoint_and_not_disabled(environ: dict[str, str], expected: bool) -> None:
    assert telemetry.tracing_requested(environ) is expected


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/venv/bin/celery", "-A", "orchestrator_site", "worker", "-Q", "realtime"], "orchestrator-worker"),
        (["/venv/bin/celery", "-A", "orchestrator_site", "beat"], "orchestrator-beat"),
        (["/venv/bin/celery", "-A", "orchestrator_site", "flower"], "orchestrator-flower"),
        (["/venv/bin/celery", "-A", "orchestrator_site", "inspect", "ping"], "orchestrator-celery"),
        (["/venv/bin/daphne", "orchestrator_site.asgi:application"], "orchestrator-gateway"),
        (["/venv/bin/python", "-m", "uvicorn", "orchestrator_site.asgi:application"], "orchestrator-gateway"),
        (["manage.py", "migrate"], "orchestrator-manage"),
    ],
)
def test_the_service_name_is_the_process_role(argv: list[str], expected: str) -> None:
    assert telemetry.service_name(argv, environ={}) == expected
    assert telemetry.service_name(argv, environ={"OTEL_SERVICE_NAME": "mine"}) == "mine"


def test_off_nothing_is_installed_and_spans_are_free() -> None:
    assert not telemetry.enabled()  # the suite's own process runs without an endpoint
    assert telemetry.configure_tracing() is False
    with telemetry.span("pipeline.rag", {"worker": "echo"}) as span:
        assert span is None
    telemetry.annotate(dedup_key="k", cache_hit=True)  # nothing to annotate, nothing raised
    headers: dict[str, str] = {}
    with telemetry.http_client_span("POST", "http://127.0.0.1:9/v1/chat/completions", headers) as call:
        telemetry.http_status(call, 503)
    assert call is None and headers == {}  # no span, no trace context sent
    assert telemetry.add_trace_context(None, "info", {"event": "x"}) == {"event": "x"}
    # No instrumentation patched the libraries.
    import httpx

    assert not hasattr(httpx.Client.send, "__wrapped__")


def test_on_spans_nest_and_log_lines_carry_the_trace() -> None:
    # In a process of its own: the instrumentation must not patch the suite's libraries.
    code = """
import os, json
os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens; export errors stay in the exporter
import django; django.setup()
from orchestrator_site import telemetry
assert telemetry.enabled() and telemetry.configure_tracing()  # once per process: the second call changes nothing
with telemetry.span("outer", {"a": 1}) as outer:
    with telemetry.span("pipeline.rag", {"worker": "echo"}) as inner:
        telemetry.annotate(tokens=3, skipped=None)
        event = telemetry.add_trace_context(None, "info", {})
        print(json.dumps({
            "same_trace": inner.get_span_context().trace_id == outer.get_span_context().trace_id,
            "parent": inner.parent.span_id == outer.get_span_context().span_id,
            "attributes": dict(inner.attributes),
            "event": event,
            "trace_id": f"{inner.get_span_context().trace_id:032x}",
        }))
headers = {}
with telemetry.span("pipeline.inference", {}) as stage:
    with telemetry.http_client_span("POST", "http://127.0.0.1:8081/v1/chat/completions", headers) as call:
        telemetry.http_status(call, 503)
print(json.dumps({
    "kind": call.kind.name,
    "name": call.name,
    "parent": call.parent.span_id == stage.get_span_context().span_id,
    "attributes": dict(call.attributes),
    "error": call.status.status_code.name,
    "traceparent": headers.get("traceparent"),
    "expected": f"00-{call.get_span_context().trace_id:032x}-{call.get_span_context().span_id:016x}-{int(call.get_span_context().trace_flags):02x}",
}))
"""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "orchestrator_site.settings", "OTEL_BSP_EXPORT_TIMEOUT": "100"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out, call = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert out["same_trace"] and out["parent"]
    assert out["attributes"] == {"worker": "echo", "tokens": 3}
    assert out["event"]["trace_id"] == out["trace_id"] and len(out["event"]["span_id"]) == 16
    # An outgoing HTTP call: a CLIENT span under the stage's, its trace context sent along.
    assert (call["kind"], call["name"], call["parent"], call["error"]) == ("CLIENT", "POST", True, "ERROR")
    assert call["attributes"] == {
        "http.request.method": "POST",
        "url.full": "http://127.0.0.1:8081/v1/chat/completions",
        "server.address": "127.0.0.1",
        "server.port": 8081,
        "http.response.status_code": 503,
    }
    assert call["traceparent"] == call["expected"]


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging(level="INFO", fmt="json")
    buffer = io.StringIO()
    root.handlers[0].setStream(buffer)  # type: ignore[attr-defined]
    yield buffer
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()
    configure_logging(level="WARNING", fmt="console")


def access_lines(buffer: io.StringIO) -> list[dict]:
    lines = [json.loads(line) for line in buffer.getvalue().strip().splitlines() if line]
    return [line for line in lines if line.get("event") == "http_request"]


@pytest.mark.django_db
def test_every_request_gets_one_access_line_without_its_query(json_logs: io.StringIO) -> None:
    Client().get("/health?token=do-not-log-me")
    Client().get("/api/v1/nowhere")
    lines = access_lines(json_logs)
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [("GET", "/health", 200), ("GET", "/api/v1/nowhere", 404)]
    assert all(isinstance(line["duration_us"], int) and line["outcome"] == "ok" and line["logger"] == "orchestrator_site.access" for line in lines)
    assert "do-not-log-me" not in json.dumps(lines)


@pytest.mark.django_db(transaction=True)
def test_the_async_path_logs_too(json_logs: io.StringIO) -> None:
    resp = async_to_sync(AsyncClient().post)("/api/v1/infer", {"prompt": "x"}, content_type="application/json")
    assert resp.status_code == 401
    assert [(line["method"], line["path"], line["status"]) for line in access_lines(json_logs)] == [("POST", "/api/v1/infer", 401)]


@pytest.mark.django_db
def test_below_info_no_access_line_is_built(capsys: pytest.CaptureFixture[str]) -> None:
    Client().get("/health")
    assert "http_request" not in capsys.readouterr().err  # the suite logs at WARNING
