"""Every recorded metric, read from the exposition of the process that records it:
the Celery worker's own port for the stages, workers and streams, the gateway's
``/metrics`` for deduplication, shedding and rate limits."""

from __future__ import annotations

import httpx
import pytest
from django.test import Client

from pipeline.config import LimitsConfig, PipelineSettings
from pipeline.models import Tenant
from pipeline.services import gates, start
from pipeline.services.start import StartKind
from pipeline.types import STAGES, PromptRequest
from tests.conftest import Fakes, TenantFixture, WorkerProcess, start_request
from tests.orchestrator_site.test_metrics import Samples, parse, value


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, series), v in samples.items() if n == name and wanted <= series)


def worker_scrape(worker: WorkerProcess) -> Samples:
    resp = httpx.get(worker.metrics_url, timeout=10)
    assert resp.status_code == 200
    return parse(resp.text)


def gateway_scrape() -> Samples:
    return parse(Client().get("/metrics").content.decode())


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_request_leaves_stage_worker_and_stream_metrics_in_the_worker(owner: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes) -> None:
    before = worker_scrape(realtime_worker)
    resp = owner.client.post("/api/v1/infer", {"prompt": "count me in", "worker": "openai"}, format="json")
    assert resp.status_code == 200, resp.json()
    after = worker_scrape(realtime_worker)
    for stage in STAGES:
        assert delta(before, after, "orchestrator_stage_duration_seconds_count", stage=stage) == 1, stage
    assert delta(before, after, "orchestrator_stage_duration_seconds_count", stage="inference", outcome="ok") == 1
    assert delta(before, after, "orchestrator_worker_latency_seconds_count", worker="openai", outcome="ok") == 1
    assert delta(before, after, "orchestrator_worker_latency_seconds_sum", worker="openai") > 0
    assert delta(before, after, "orchestrator_ttft_seconds_count", worker="openai") == 1
    assert delta(before, after, "orchestrator_stream_tokens_total", worker="openai") >= 1
    assert delta(before, after, "orchestrator_stream_duration_seconds_count", worker="openai", outcome="ok") == 1
    assert delta(before, after, "orchestrator_pipeline_requests_total", worker="openai", outcome="ok") == 1
    # The openai worker retries nothing here; its retry histogram says 0 retries.
    assert delta(before, after, "orchestrator_worker_retries_count", worker="openai") == 0
    # TTFT is measured from the gateway's acceptance: it cannot be shorter than the stages.
    ttft = delta(before, after, "orchestrator_ttft_seconds_sum", worker="openai")
    inference = delta(before, after, "orchestrator_stage_duration_seconds_sum", stage="inference")
    assert ttft >= inference


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_retries_and_failures_are_counted_per_worker(owner: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes) -> None:
    before = worker_scrape(realtime_worker)
    fakes.openai.fail_times, fakes.openai.fail_mode, fakes.openai.retry_after = 2, "429", "0"
    assert owner.client.post("/api/v1/infer", {"prompt": "again", "worker": "openai_retry"}, format="json").status_code == 200
    after = worker_scrape(realtime_worker)
    assert delta(before, after, "orchestrator_worker_retries_count", worker="openai_retry") == 1
    assert delta(before, after, "orchestrator_worker_retries_sum", worker="openai_retry") == 2
    assert delta(before, after, "orchestrator_worker_retries_bucket", worker="openai_retry", le="1.0") == 0
    assert delta(before, after, "orchestrator_worker_retries_bucket", worker="openai_retry", le="2.0") == 1

    fakes.openai.fail_times, fakes.openai.fail_mode = 5, "503"
    resp = owner.client.post("/api/v1/infer", {"prompt": "fail", "worker": "openai_retry"}, format="json")
    assert resp.status_code == 503
    code = resp.json()["error"]["code"]
    final = worker_scrape(realtime_worker)
    assert delta(after, final, "orchestrator_pipeline_requests_total", worker="openai_retry", outcome=code) == 1
    assert delta(after, final, "orchestrator_worker_latency_seconds_count", worker="openai_retry", outcome=code) == 1
    assert delta(after, final, "orchestrator_stage_duration_seconds_count", stage="inference", outcome=code) == 1
    assert delta(after, final, "orchestrator_worker_retries_sum", worker="openai_retry") == 2  # three attempts, then it gave up
    assert delta(after, final, "orchestrator_stream_tokens_total", worker="openai_retry") == 0


def prompt(owner: TenantFixture, text: str, config: PipelineSettings) -> PromptRequest:
    return start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": text, "session_id": "metrics"}, config=config)


@pytest.mark.django_db
def test_dedup_hits_and_misses_and_the_ratio_on_the_gateway(owner: TenantFixture, dedup_on: PipelineSettings, unpublished: list) -> None:
    before = gateway_scrape()  # nothing runs: the first stays in flight
    assert start_request(prompt(owner, "metric me", dedup_on)).kind is StartKind.SUBMITTED
    assert start_request(prompt(owner, "metric me", dedup_on)).kind is StartKind.ATTACHED
    assert start_request(prompt(owner, "metric me", dedup_on)).kind is StartKind.ATTACHED
    after = gateway_scrape()
    assert delta(before, after, "orchestrator_dedup_requests_total", outcome="miss") == 1
    assert delta(before, after, "orchestrator_dedup_requests_total", outcome="hit") == 2
    hits, misses = total(after, "orchestrator_dedup_requests_total", outcome="hit"), total(after, "orchestrator_dedup_requests_total", outcome="miss")
    assert value(after, "orchestrator_dedup_hit_ratio") == pytest.approx(hits / (hits + misses))


@pytest.mark.django_db
def test_shed_requests_are_counted_by_scope(owner: TenantFixture, pipeline_config: object) -> None:
    pipeline_config(PipelineSettings(limits=LimitsConfig(max_inflight_per_tenant=1, max_inflight_global=5)))  # type: ignore[operator]
    gate = gates.admission()
    assert gate.acquire(str(owner.tenant.id), "held").admitted
    try:
        before = gateway_scrape()
        assert owner.client.post("/api/v1/infer", {"prompt": "p"}, format="json").status_code == 503
        after = gateway_scrape()
    finally:
        gate.release(str(owner.tenant.id), "held")
    assert delta(before, after, "orchestrator_requests_shed_total", scope="tenant") == 1
    assert delta(before, after, "orchestrator_requests_shed_total", scope="global") == 0


@pytest.mark.django_db
def test_rate_limited_requests_are_counted_by_kind(owner: TenantFixture, dedup_on: PipelineSettings) -> None:
    Tenant.objects.filter(pk=owner.tenant.pk).update(requests_per_minute=1)
    assert owner.client.post("/api/v1/infer", {"prompt": "a", "wait": False}, format="json").status_code == 202
    before = gateway_scrape()
    assert owner.client.post("/api/v1/infer", {"prompt": "b", "wait": False}, format="json").status_code == 429
    after = gateway_scrape()
    assert delta(before, after, "orchestrator_rate_limited_total", kind="requests_per_minute") == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_provider_faults_leave_their_metrics(owner: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes, clean_breakers: None) -> None:
    """A 5xx burst opens the breaker (gauge 2, the fallback answers), a 429 storm runs
    the retries out, a hanging provider ends in worker_timeout — each visible in the
    expositions of the gateway and the worker."""
    before = worker_scrape(realtime_worker)
    fakes.openai.mode = "503"
    for _ in range(2):  # failure_threshold = 2
        assert owner.client.post("/api/v1/infer", {"prompt": "burst", "worker": "flaky"}, format="json").status_code == 503
    assert value(gateway_scrape(), "orchestrator_circuit_breaker_state", worker="flaky") == 2
    fallback = owner.client.post("/api/v1/infer", {"prompt": "to the fallback", "worker": "flaky"}, format="json")
    assert fallback.status_code == 200 and fallback.json()["worker"] == "echo"

    fakes.openai.mode, fakes.openai.retry_after = "429", "0"
    storm = owner.client.post("/api/v1/infer", {"prompt": "storm", "worker": "openai_retry"}, format="json")
    assert storm.status_code == 429 and storm.json()["error"]["code"] == "worker_rate_limited"

    fakes.openai.mode, fakes.openai.hang_s = "hang", 3.0  # beyond the worker's timeout_s = 2
    hung = owner.client.post("/api/v1/infer", {"prompt": "hang", "worker": "openai"}, format="json")
    assert hung.status_code == 504 and hung.json()["error"]["code"] == "worker_timeout"

    after = worker_scrape(realtime_worker)
    assert delta(before, after, "orchestrator_pipeline_requests_total", worker="flaky", outcome="worker_unavailable") == 2
    assert delta(before, after, "orchestrator_pipeline_requests_total", worker="echo", outcome="ok") == 1  # the fallback
    assert delta(before, after, "orchestrator_pipeline_requests_total", worker="openai_retry", outcome="worker_rate_limited") == 1
    assert delta(before, after, "orchestrator_worker_retries_sum", worker="openai_retry") == 2  # three attempts
    assert delta(before, after, "orchestrator_pipeline_requests_total", worker="openai", outcome="worker_timeout") == 1
    assert delta(before, after, "orchestrator_worker_latency_seconds_sum", worker="openai", outcome="worker_timeout") >= 2.0
