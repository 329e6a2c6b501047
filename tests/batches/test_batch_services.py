"""Running a batch job's items in this process: claims and leases, idempotent
recording, the provider-down path, failures item by item, completion, recovery."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

import pytest
from django.db import DatabaseError
from django.utils import timezone
from hypothesis import given
from hypothesis import strategies as st
from kombu.exceptions import OperationalError as KombuOperationalError

from batches import services
from batches.models import BatchItem, BatchJob
from batches.services import Prompt, batch_create, batch_recover, batch_recover_boundary, batch_run_chunk, chunk_ranges
from pipeline import engine
from pipeline.config import BatchConfig, PipelineSettings, get_config
from pipeline.resilience.breaker import BreakerState
from pipeline.services.gates import breaker_for
from tests.conftest import TenantFixture


def with_batch(**fields: Any) -> PipelineSettings:
    """The test config with other batch settings."""
    config = get_config()
    return config.model_copy(update={"batch": config.batch.model_copy(update=fields)})


def make_job(owner: TenantFixture, prompts: list[str], **data: Any) -> BatchJob:
    return batch_create(tenant=owner.tenant, data={"prompts": [Prompt(p, f"id-{i}") for i, p in enumerate(prompts)], **data}, config=get_config())


def statuses(job: BatchJob) -> list[str]:
    return list(job.items.order_by("index").values_list("status", flat=True))


@pytest.mark.django_db
def test_a_chunk_runs_its_items_through_the_stages_and_completes_the_job(owner: TenantFixture, fakes: Any) -> None:
    job = make_job(owner, ["alpha", "beta", "gamma"], worker="openai", max_tokens=9, stop=["zzz"])
    batch_run_chunk(job_id=str(job.id), first=0, last=1)
    job.refresh_from_db()
    assert statuses(job) == ["done", "done", "pending"] and job.status == "running" and job.started_at is not None
    assert (job.items_done, job.items_failed) == (2, 0)
    batch_run_chunk(job_id=str(job.id), first=2, last=3)
    job.refresh_from_db()
    assert job.status == "completed" and job.finished_at is not None and job.items_done == 3
    item = job.items.get(index=1)
    assert item.output == "Hello, world!" and item.usage["total_tokens"] > 0 and item.attempts == 1 and item.leased_until is None
    body = fakes.openai.requests[-1]["body"]
    assert body["model"] == "gpt-fake" and body["max_completion_tokens"] == 9 and "zzz" in body["stop"]
    assert body["messages"][-1]["content"] == "gamma"  # no conversation history mixed in


@pytest.mark.django_db
def test_items_see_the_tenants_documents(owner: TenantFixture, fakes: Any) -> None:
    owner.client.post("/api/v1/documents", {"title": "Refunds", "body": "Refunds within 30 days."}, format="json")
    job = make_job(owner, ["What about refunds?"], worker="openai")
    batch_run_chunk(job_id=str(job.id), first=0, last=0)
    assert job.items.get().status == "done"
    assert "Refunds within 30 days." in str(fakes.openai.requests[-1]["body"]["messages"])  # RAG ran for the item


@pytest.mark.django_db
def test_a_second_run_of_a_chunk_records_nothing_twice(owner: TenantFixture) -> None:
    job = make_job(owner, ["a", "b"])
    batch_run_chunk(job_id=str(job.id), first=0, last=1)
    before = list(job.items.values_list("output", "finished_at"))
    batch_run_chunk(job_id=str(job.id), first=0, last=1)  # a redelivered message
    job.refresh_from_db()
    assert job.items_done == 2 and list(job.items.values_list("output", "finished_at")) == before


@pytest.mark.django_db
def test_recording_an_item_answered_already_changes_nothing(owner: TenantFixture) -> None:
    job = make_job(owner, ["a"])
    batch_run_chunk(job_id=str(job.id), first=0, last=0)
    item = job.items.get()
    services._record_many(job, [services.Outcome(item, error=services.OrchestratorError("late duplicate"))])
    job.refresh_from_db()
    item.refresh_from_db()
    assert (job.items_done, job.items_failed, item.status, item.error) == (1, 0, "done", None)


@pytest.mark.django_db
def test_an_item_leased_to_another_run_is_left_to_it(owner: TenantFixture) -> None:
    job = make_job(owner, ["a", "b"])
    BatchItem.objects.filter(job=job, index=0).update(leased_until=timezone.now() + dt.timedelta(minutes=5))
    batch_run_chunk(job_id=str(job.id), first=0, last=1)
    assert statuses(job) == ["pending", "done"]
    BatchItem.objects.filter(job=job, index=0).update(leased_until=timezone.now() - dt.timedelta(seconds=1))  # its runner died
    batch_run_chunk(job_id=str(job.id), first=0, last=1)
    assert statuses(job) == ["done", "done"] and job.items.get(index=0).attempts == 1


@pytest.mark.django_db
def test_a_provider_that_is_down_pauses_the_chunk_then_fails_the_item_when_attempts_run_out(
    owner: TenantFixture, fakes: Any, queued: list[tuple[Any, ...]], pipeline_config: Any
) -> None:
    pipeline_config(with_batch(max_attempts=2, retry_delay_s=7))
    fakes.openai.mode = "503"
    job = make_job(owner, ["a", "b"], worker="openai", priority="low")
    batch_run_chunk(job_id=str(job.id), first=0, last=1)
    first = job.items.get(index=0)
    assert statuses(job) == ["pending", "pending"] and first.attempts == 1 and first.leased_until is None
    assert first.error is not None and first.error["code"] == "worker_unavailable"
    assert queued == [(str(job.id), 0, 1, "batch.low", 7)]  # the chunk again, later, on the job's queue

    batch_run_chunk(job_id=str(job.id), first=0, last=1)  # second attempt: out of attempts
    job.refresh_from_db()
    assert job.items.get(index=0).status == "failed" and job.items.get(index=0).error["code"] == "worker_unavailable"
    assert job.items.get(index=1).status == "pending"
    fakes.openai.mode = "ok"  # the provider is back for the rest
    batch_run_chunk(job_id=str(job.id), first=0, last=1)
    job.refresh_from_db()
    assert statuses(job) == ["failed", "done"] and job.status == "completed" and (job.items_done, job.items_failed) == (1, 1)


@pytest.mark.django_db
def test_item_outcomes_and_their_stages_are_measured(owner: TenantFixture, fakes: Any, queued: list[tuple[Any, ...]], pipeline_config: Any) -> None:
    from tests.pipeline.test_metrics_flow import delta, gateway_scrape

    pipeline_config(with_batch(max_attempts=2))
    before = gateway_scrape()
    fakes.openai.mode = "503"
    job = make_job(owner, ["down", "down again"], worker="openai", priority="high")
    batch_run_chunk(job_id=str(job.id), first=0, last=1)  # deferred
    batch_run_chunk(job_id=str(job.id), first=0, last=1)  # out of attempts: failed, the next deferred
    fakes.openai.mode = "ok"
    batch_run_chunk(job_id=str(job.id), first=0, last=1)
    after = gateway_scrape()  # this process ran them: its own exposition has the counts
    assert delta(before, after, "orchestrator_batch_items_total", priority="high", outcome="retry_later") == 2
    assert delta(before, after, "orchestrator_batch_items_total", priority="high", outcome="worker_unavailable") == 1
    assert delta(before, after, "orchestrator_batch_items_total", priority="high", outcome="ok") == 1
    assert delta(before, after, "orchestrator_stage_duration_seconds_count", stage="inference", outcome="worker_unavailable") == 3
    assert delta(before, after, "orchestrator_worker_latency_seconds_count", worker="openai", outcome="ok") == 1
    assert delta(before, after, "orchestrator_stage_duration_seconds_count", stage="rag") == 4  # each run from the first stage


@pytest.mark.django_db
def test_an_open_circuit_sends_items_to_the_fallback(owner: TenantFixture, fakes: Any, clean_breakers: None) -> None:
    config = get_config()
    for _ in range(config.workers["flaky"].breaker.failure_threshold):
        breaker_for(config, "flaky").record(success=False)
    assert breaker_for(config, "flaky").allow().state == BreakerState.OPEN
    calls = len(fakes.openai.requests)
    job = make_job(owner, ["to the fallback"], worker="flaky")
    batch_run_chunk(job_id=str(job.id), first=0, last=0)
    assert job.items.get().status == "done" and "to the fallback" in job.items.get().output
    assert len(fakes.openai.requests) == calls  # no call to the failing provider


@pytest.mark.django_db
def test_an_item_whose_runs_keep_dying_is_failed_with_its_last_error(owner: TenantFixture, pipeline_config: Any) -> None:
    pipeline_config(with_batch(max_attempts=2))
    job = make_job(owner, ["poison", "interrupted", "fine"])
    BatchItem.objects.filter(job=job, index=0).update(attempts=2, error={"code": "worker_unavailable", "message": "down", "data": {}})
    BatchItem.objects.filter(job=job, index=1).update(attempts=2)
    batch_run_chunk(job_id=str(job.id), first=0, last=2)
    poison, interrupted = job.items.get(index=0), job.items.get(index=1)
    assert poison.status == "failed" and poison.error["code"] == "worker_unavailable" and poison.attempts == 3
    assert interrupted.status == "failed" and interrupted.error["code"] == "internal_error" and "interrupted 2 times" in interrupted.error["message"]
    assert statuses(job)[2] == "done"


@pytest.mark.django_db
def test_an_item_that_crashes_fails_alone(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    real = engine.run_pipeline

    def crash_on_b(request: Any, deps: Any, observed: Any = None) -> Any:
        if request.prompt == "b":
            raise RuntimeError("a bug in a stage")
        return real(request, deps, observed)

    monkeypatch.setattr(services, "run_pipeline", crash_on_b)
    job = make_job(owner, ["a", "b", "c"])
    batch_run_chunk(job_id=str(job.id), first=0, last=2)
    job.refresh_from_db()
    assert statuses(job) == ["done", "failed", "done"] and job.status == "completed"
    assert job.items.get(index=1).error == {"code": "internal_error", "message": "internal error while running the item", "data": {}}


@pytest.mark.django_db
def test_the_chunk_boundary_keeps_database_and_unexpected_errors_inside(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    job = make_job(owner, ["a"])

    def down(*args: Any) -> None:
        raise DatabaseError("server closed the connection unexpectedly")

    monkeypatch.setattr(services, "_claim", down)
    batch_run_chunk(job_id=str(job.id), first=0, last=0)  # logged, not raised
    monkeypatch.setattr(services, "_claim", lambda *args: 1 / 0)
    batch_run_chunk(job_id=str(job.id), first=0, last=0)
    assert statuses(job) == ["pending"]  # left for the next run or the sweep


@pytest.mark.django_db
def test_unknown_jobs_and_finished_ones_are_ignored(owner: TenantFixture) -> None:
    batch_run_chunk(job_id="8f4c1f39-7b44-4c59-9f0e-1f6f1c2f6d11", first=0, last=10)
    job = make_job(owner, ["a"])
    BatchJob.objects.filter(pk=job.pk).update(status="completed")
    batch_run_chunk(job_id=str(job.id), first=0, last=0)
    assert statuses(job) == ["pending"]


@pytest.mark.django_db
def test_the_sweep_requeues_stalled_jobs_items_nobody_holds(owner: TenantFixture, queued: list[tuple[Any, ...]], pipeline_config: Any) -> None:
    pipeline_config(with_batch(chunk_size=2, stall_after_s=60))
    stalled = make_job(owner, ["a", "b", "c", "d", "e"], priority="high")
    fresh = make_job(owner, ["f"])
    finished = make_job(owner, ["g"])
    BatchJob.objects.filter(pk=finished.pk).update(status="completed")
    BatchItem.objects.filter(job=stalled, index__in=[0, 1]).update(status="done")
    BatchItem.objects.filter(job=stalled, index=2).update(leased_until=timezone.now() + dt.timedelta(minutes=5))  # being run
    later = timezone.now() + dt.timedelta(seconds=61)
    BatchJob.objects.filter(pk=fresh.pk).update(progressed_at=later)
    assert batch_recover(now=later) == 2
    assert queued == [(str(stalled.id), 2, 3, "batch.high", 0.0), (str(stalled.id), 4, 5, "batch.high", 0.0)]  # chunk 2-3 for item 3
    assert batch_recover(now=later + dt.timedelta(seconds=30)) == 0  # not again before another stall
    assert batch_recover(now=later + dt.timedelta(seconds=62)) == 3  # both again, the fresh one stalled too by then


@pytest.mark.django_db
def test_a_sweep_while_the_broker_is_down_tries_again_next_time(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from batches.tasks import run_batch_chunk

    job = make_job(owner, ["a"])

    def broker_down(*args: Any, **kwargs: Any) -> None:
        raise KombuOperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(run_batch_chunk, "apply_async", broker_down)
    assert batch_recover(now=timezone.now() + dt.timedelta(hours=1)) == 0
    job.refresh_from_db()
    assert job.status == "queued" and statuses(job) == ["pending"]


@pytest.mark.django_db
def test_the_sweeps_boundary_logs_instead_of_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    def down(**kwargs: Any) -> int:
        raise DatabaseError("the database system is shutting down")

    monkeypatch.setattr(services, "batch_recover", down)
    batch_recover_boundary()
    monkeypatch.setattr(services, "batch_recover", lambda **kwargs: 1 / 0)
    batch_recover_boundary()


@given(st.lists(st.integers(0, 10_000), max_size=200), st.integers(1, 50))
def test_chunks_cover_every_index_once_aligned_to_the_chunk_size(indexes: list[int], size: int) -> None:
    chunks = chunk_ranges(indexes, size)
    assert all(first % size == 0 and last == first + size - 1 for first, last in chunks)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(chunks))  # ordered, disjoint
    assert all(sum(first <= i <= last for first, last in chunks) == 1 for i in indexes)
    assert len(chunks) == len({i // size for i in indexes})


def test_the_batch_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        BatchConfig(chunk_size=0)
    assert PipelineSettings().batch == BatchConfig()


@pytest.mark.django_db
def test_every_item_is_logged_stage_by_stage_and_the_job_from_start_to_end(owner: TenantFixture) -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        job = make_job(owner, ["alpha-private", "beta-private"])
        batch_run_chunk(job_id=str(job.id), first=0, last=1)
    stages = [e for e in logs if e["event"] == "stage"]
    assert [(e["request_id"], e["stage"]) for e in stages] == [
        (f"{job.id.hex}-{i}", s) for i in (0, 1) for s in ("rag", "assemble", "inference", "post", "stream")
    ]
    assert all(e["session_id"] == f"batch-{job.id.hex}" and e["tenant_id"] == str(owner.tenant.id) and "duration_us" in e and e["outcome"] for e in stages)
    assert "private" not in repr(logs)  # the prompts and answers themselves are never logged
    lifecycle = [(e["event"], e["job_id"]) for e in logs if e["event"].startswith("batch_")]
    assert lifecycle == [("batch_created", str(job.id)), ("batch_completed", str(job.id))]


@pytest.mark.django_db
def test_an_open_circuit_without_a_fallback_defers_items_rather_than_failing_them(
    owner: TenantFixture, fakes: Any, queued: list[tuple[Any, ...]], clean_breakers: None
) -> None:
    config = get_config()
    breaker_for(config, "flaky_alone").record(success=False)  # failure_threshold = 1
    calls = len(fakes.openai.requests)
    job = make_job(owner, ["wait for it"], worker="flaky_alone")
    batch_run_chunk(job_id=str(job.id), first=0, last=0)
    item = job.items.get()
    assert item.status == "pending" and item.error is not None and item.error["code"] == "circuit_open"
    assert len(fakes.openai.requests) == calls and len(queued) == 1  # no call made; the chunk waits its turn


@pytest.mark.django_db
def test_a_chunk_touches_only_its_own_jobs_items(owner: TenantFixture, outsider: TenantFixture) -> None:
    mine = make_job(owner, ["a", "b"])
    theirs = batch_create(tenant=outsider.tenant, data={"prompts": [Prompt("x"), Prompt("y")]}, config=get_config())
    batch_run_chunk(job_id=str(mine.id), first=0, last=1)
    theirs.refresh_from_db()
    assert statuses(mine) == ["done", "done"] and statuses(theirs) == ["pending", "pending"]
    assert (theirs.status, theirs.items_done, theirs.started_at) == ("queued", 0, None)
    assert "x" not in mine.items.get(index=0).output
