"""One trace per request across real processes, and JSON logs that correlate with it.

A Daphne gateway and a Celery worker run as processes of their own, with tracing
on (OTLP/HTTP to a collector on loopback) and JSON logs at INFO. Requests go
through them over HTTP; then every span and every log line is checked."""

from __future__ import annotations

import itertools
import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pipeline.auth import tenant_create
from pipeline.types import STAGES
from tests.conftest import Fakes, start_celery_worker, start_gateway, stop_process
from tests.fakes.otlp import FakeCollector, Span

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5
PIPELINE_EVENT_FIELDS = {"stage", "session_id", "request_id", "duration_us", "outcome", "tenant_id", "worker"}


@dataclass
class Platform:
    url: str
    collector: FakeCollector
    logs: list[Path]


@pytest.fixture(scope="module")
def platform(django_db_setup: None, django_db_blocker: object, session_fakes: Fakes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    collector = FakeCollector().start()
    tmp = tmp_path_factory.mktemp("traced")
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # ms: the test does not wait for the default 5 s batches
        # A broker of their own: the suite's other worker must not take these tasks.
        "CELERY_BROKER_KEY_PREFIX": f"traced{uuid.uuid4().hex[:8]}:",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
    }
    # Deduplication on, so that the spans carry the key and whether it hit.
    config = re.sub(r"\[dedup\]\nenabled = false[^\n]*", "[dedup]\nenabled = true\nwindow_s = 60", Path(os.environ["PIPELINE_CONFIG"]).read_text())
    assert "enabled = true" in config
    (tmp / "pipeline.toml").write_text(config)
    env["PIPELINE_CONFIG"] = str(tmp / "pipeline.toml")
    worker_log, gateway_log = tmp / "worker.log", tmp / "gateway.log"
    worker = start_celery_worker(
        "realtime", f"traced-{os.getpid()}@localhost", worker_log, {**env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path_factory.mktemp("wm"))}
    )
    gateway, url = start_gateway(gateway_log, {**env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path_factory.mktemp("gm"))})
    yield Platform(url, collector, [gateway_log, worker_log])
    stop_process(gateway)
    stop_process(worker)
    collector.stop()


def post(platform: Platform, key: str, **body: object) -> httpx.Response:
    return httpx.post(f"{platform.url}/api/v1/infer", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def trace_of(platform: Platform, request_id: str) -> list[Span]:
    """Every span of the trace whose ``pipeline.stream`` span carries ``request_id``."""

    def complete(spans: list[Span]) -> bool:
        # Spans are exported as they end, in batches: the task's and the server's end last.
        ends = [s for s in spans if s.name == "pipeline.stream" and s.attributes.get("request_id") == request_id]
        kinds = {s.kind for s in spans if ends and s.trace_id == ends[0].trace_id}
        return {SERVER, PRODUCER, CONSUMER, CLIENT} <= kinds

    spans = platform.collector.wait_for(complete)
    ends = [s for s in spans if s.name == "pipeline.stream" and s.attributes.get("request_id") == request_id]
    assert ends, f"no pipeline.stream span for {request_id}; names seen: {sorted({s.name for s in spans})}"
    return [s for s in spans if s.trace_id == ends[0].trace_id]


def one(spans: list[Span], **match: object) -> Span:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, [(s.service, s.name, s.kind) for s in spans])
    return found[0]


def ancestors(span: Span, by_id: dict[str, Span]) -> list[Span]:
    chain = []
    while span.parent_id in by_id:
        span = by_id[span.parent_id]
        chain.append(span)
    return chain


def test_one_trace_from_the_gateway_through_celery_to_the_stages_and_the_provider_call(platform: Platform, session_fakes: Fakes) -> None:
    session_fakes.reset()
    issued = tenant_create(name="traced")
    resp = post(platform, issued.raw, prompt="trace me", worker="openai", temperature=0)
    assert resp.status_code == 200, resp.text
    request_id = resp.json()["request_id"]
    spans = trace_of(platform, request_id)
    by_id = {s.span_id: s for s in spans}

    root = one(spans, kind=SERVER)
    assert root.service == "orchestrator-gateway" and root.parent_id == "" and "infer" in root.name
    publish = one(spans, kind=PRODUCER)
    assert publish.service == "orchestrator-gateway" and root in ancestors(publish, by_id)
    task = one(spans, kind=CONSUMER)
    assert task.service == "orchestrator-worker" and task.parent_id == publish.span_id
    assert task.attributes["request_id"] == request_id and task.attributes["cache_hit"] is False
    assert len(task.attributes["dedup_key"]) == 64 and root.attributes["dedup_key"] == task.attributes["dedup_key"]
    assert root.attributes["cache_hit"] is False

    stages = [one(spans, name=f"pipeline.{stage}") for stage in STAGES]
    assert all(s.parent_id == task.span_id and s.service == "orchestrator-worker" for s in stages)
    assert [s.start_ns for s in stages] == sorted(s.start_ns for s in stages)
    assert all(a.end_ns <= b.start_ns for a, b in itertools.pairwise(stages))  # in order, none overlapping
    assert all(s.attributes["worker"] == "openai" and s.attributes["model"] == "gpt-fake" for s in stages)
    inference = stages[STAGES.index("inference")]
    assert inference.attributes["tokens"] == resp.json()["usage"]["total_tokens"]
    # Under the inference: the provider call.
    under = [s for s in spans if s.kind == CLIENT and s.parent_id == inference.span_id]
    call = one([s for s in under if s.attributes.get("http.request.method", s.attributes.get("http.method")) == "POST"])
    assert call.service == "orchestrator-worker" and call.attributes.get("url.full", call.attributes.get("http.url", "")).endswith("/chat/completions")
    # The provider was sent the trace context: its own spans would join this trace.
    sent = [h["traceparent"].split("-")[1:3] for h in session_fakes.openai.headers_seen if "traceparent" in h]
    assert [root.trace_id, call.span_id] in sent
    # A whole answer publishes no token under the inference: it is written once, with done.
    assert not any(s.name.startswith("EVALSHA") for s in under)
    assert any(s.name.startswith("EVALSHA") and task in ancestors(s, by_id) for s in spans)  # the fenced begin and finish
    # No span of another trace belongs to this request.
    others = [s for s in platform.collector.spans if s.attributes.get("request_id") == request_id and s.trace_id != root.trace_id]
    assert others == []
    # The same request again is answered from the window: its trace says so, and runs no task.
    again = post(platform, issued.raw, prompt="trace me", worker="openai", temperature=0)
    assert again.status_code == 200 and again.json()["request_id"] == request_id

    def hit(spans: list[Span]) -> bool:
        return any(s.kind == SERVER and s.attributes.get("cache_hit") is True for s in spans)

    served = [s for s in platform.collector.wait_for(hit) if s.kind == SERVER and s.attributes.get("cache_hit") is True]
    assert served and served[0].attributes["dedup_key"] == task.attributes["dedup_key"]
    assert not [s for s in platform.collector.spans if s.trace_id == served[0].trace_id and s.kind == CONSUMER]


def test_logs_are_json_with_the_pipeline_schema_and_carry_the_trace(platform: Platform, session_fakes: Fakes) -> None:
    session_fakes.reset()
    issued = tenant_create(name="logged")
    marker = f"PROMPT-{uuid.uuid4().hex}"
    planted = ["sk-live-" + "a1B2c3D4e5F6g7H8i9J0", "AKIA" + "ABCDEFGHIJKLMNOP", f"Bearer {'x' * 24}"]
    secret_prompt = f"{marker} my keys: {' '.join(planted)}"
    ok = post(platform, issued.raw, prompt=secret_prompt, worker="openai")
    assert ok.status_code == 200, ok.text
    echo = post(platform, issued.raw, prompt=f"{marker} echo", session_id="sess-logs")
    assert echo.status_code == 200
    session_fakes.openai.mode = "401"
    failed = post(platform, issued.raw, prompt=f"{marker} fails", worker="openai")
    assert failed.status_code >= 400 and failed.json()["error"]["code"]
    assert post(platform, issued.raw, prompt="", worker="openai").status_code == 400
    assert (
        httpx.post(f"{platform.url}/api/v1/infer", json={"prompt": marker}, headers={"Authorization": "Bearer po_00000000_nope-nope-nope"}).status_code == 401
    )
    trace_of(platform, ok.json()["request_id"])  # spans exported: the worker has logged everything about it

    lines: list[dict] = []
    for log in platform.logs:
        for raw in log.read_text().splitlines():
            assert raw.strip(), f"blank line in {log.name}"
            lines.append(json.loads(raw))  # every line, from every library, is JSON
            for secret in [marker, issued.raw, *planted]:
                assert secret not in raw, f"{log.name} leaks {secret[:12]}…: {raw[:300]}"
    events = [line for line in lines if line.get("logger") == "pipeline" and line.get("event") == "stage"]
    ids = {ok.json()["request_id"], echo.json()["request_id"]}
    assert {e["request_id"] for e in events} >= ids
    for event in events:
        missing = PIPELINE_EVENT_FIELDS - set(event)
        assert not missing, (missing, event)
        assert isinstance(event["duration_us"], int) and event["stage"] in STAGES
    mine = [e for e in events if e["request_id"] == echo.json()["request_id"]]
    assert [e["stage"] for e in mine] == list(STAGES) and {e["session_id"] for e in mine} == {"sess-logs"}
    assert any(e["outcome"] == "error" and e["stage"] == "inference" for e in events)
    # Each worker line of a traced request names the trace its spans are in.
    trace_id = trace_of(platform, ok.json()["request_id"])[0].trace_id
    assert {e.get("trace_id") for e in events if e["request_id"] == ok.json()["request_id"]} == {trace_id}
