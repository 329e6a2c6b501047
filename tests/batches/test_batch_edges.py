"""Edges of batch jobs: odd bodies, pages and limits, Unicode, what each setting
reaches, the sweep's choices, a tenant's removal."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.utils import timezone

from batches import services
from batches.api.serializers import job_out
from batches.models import BatchItem, BatchJob
from batches.services import Prompt, batch_create, batch_get, batch_recover, batch_run_chunk
from orchestrator_site.errors import NotFound
from pipeline.config import get_config
from pipeline.models import Tenant
from tests.batches.test_batch_api import BATCH, ndjson, submit
from tests.batches.test_batch_services import with_batch
from tests.conftest import TenantFixture


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [(b"[1, 2]", "application/json", 400, "invalid_request"), (b"prompts=a", "text/plain", 415, "unsupported_media_type")],
)
def test_a_body_that_is_not_a_json_object_is_refused(owner: TenantFixture, body: bytes, content_type: str, status: int, code: str) -> None:
    resp = owner.client.post(BATCH, body, content_type=content_type)
    assert resp.status_code == status and resp.json()["error"]["code"] == code
    assert not BatchJob.objects.exists()


@pytest.mark.django_db
def test_unicode_prompts_and_ids_come_back_as_they_went_in(owner: TenantFixture) -> None:
    prompts = [{"prompt": "¿Qué tal? 你好 👋🏽", "custom_id": "ünï-1"}, "שלום עולם", "e\u0301 combining"]
    job = submit(owner, {"prompts": prompts})
    batch_run_chunk(job_id=job["id"], first=0, last=24)
    rows = ndjson(owner.client.get(f"{BATCH}/{job['id']}/results"))
    assert rows[0]["custom_id"] == "ünï-1" and rows[0]["text"].startswith("¿Qué tal? 你好 👋🏽")
    assert rows[1]["text"].startswith("שלום עולם") and rows[2]["text"].startswith("e\u0301 combining")


@pytest.mark.django_db
def test_listing_caps_its_page_refuses_bad_numbers_and_ends_empty(owner: TenantFixture) -> None:
    for n in range(3):
        submit(owner, {"prompts": [f"job {n}"]})
    assert owner.client.get(BATCH, {"limit": 0}).json()["error"] == {
        "code": "invalid_request",
        "message": "limit must be a positive integer",
        "data": {"field": "limit"},
    }
    assert len(owner.client.get(BATCH, {"limit": 10_000}).json()["results"]) == 3  # at most 500: all three here
    assert owner.client.get(BATCH, {"offset": 3}).json() == {
        "count": 3,
        "next": None,
        "previous": owner.client.get(BATCH, {"offset": 3}).json()["previous"],
        "results": [],
    }
    assert owner.client.get(BATCH, {"offset": -5}).json()["error"]["data"] == {"field": "offset"}


@pytest.mark.django_db
def test_results_list_only_finished_items_and_skip_the_pending(owner: TenantFixture) -> None:
    job = submit(owner, {"prompts": ["a", "b", "c", "d"]})
    batch_run_chunk(job_id=job["id"], first=1, last=1)
    batch_run_chunk(job_id=job["id"], first=3, last=3)
    assert [r["index"] for r in ndjson(owner.client.get(f"{BATCH}/{job['id']}/results"))] == [1, 3]
    owner.client.post(f"{BATCH}/{job['id']}/cancel")
    assert [r["index"] for r in ndjson(owner.client.get(f"{BATCH}/{job['id']}/results"))] == [1, 3]  # a cancelled job keeps what it answered


@pytest.mark.django_db
def test_progress_is_rounded_and_counts_add_up(owner: TenantFixture) -> None:
    job = BatchJob(tenant=owner.tenant, worker="echo", model="echo-1", max_tokens=1, items_total=3, items_done=1, created_at=timezone.now())
    out = job_out(job)
    assert out["progress"] == 0.333333 and out["counts"] == {"total": 3, "done": 1, "failed": 0, "expired": 0, "pending": 2, "cancelled": 0}


@pytest.mark.django_db
def test_a_large_job_is_stored_in_several_inserts_with_contiguous_indexes(owner: TenantFixture, queued: list[tuple[Any, ...]]) -> None:
    job = batch_create(tenant=owner.tenant, data={"prompts": [Prompt(f"p{i}") for i in range(5001)]}, config=get_config())
    indexes = list(job.items.order_by("index").values_list("index", flat=True))
    assert indexes == list(range(5001)) and job.items_total == 5001


@pytest.mark.django_db
def test_every_setting_of_the_job_reaches_the_provider(owner: TenantFixture, fakes: Any) -> None:
    job = submit(owner, {"prompts": ["configured"], "worker": "openai", "model": "gpt-other", "temperature": 0.25, "metadata": {"team": "x"}})
    batch_run_chunk(job_id=job["id"], first=0, last=0)
    body = fakes.openai.requests[-1]["body"]
    assert body["model"] == "gpt-other" and body["temperature"] == 0.25 and body["max_completion_tokens"] == get_config().limits.default_max_tokens
    assert BatchJob.objects.get(pk=job["id"]).metadata == {"team": "x"}


@pytest.mark.django_db
def test_a_claim_leases_a_group_of_items_for_lease_s(owner: TenantFixture, pipeline_config: Any) -> None:
    config = pipeline_config(with_batch(lease_s=120, claim_group=3))
    job = batch_create(tenant=owner.tenant, data={"prompts": [Prompt(p) for p in "abcde"]}, config=config)
    before = timezone.now()
    group = services._claim(job, 1, 4, config)
    assert [item.index for item in group] == [1, 2, 3] and all(item.attempts == 1 for item in group)
    stored = list(job.items.filter(index__in=[1, 2, 3]).values_list("attempts", "leased_until"))
    assert [(attempts, leased == group[0].leased_until) for attempts, leased in stored] == [(1, True)] * 3
    assert before + dt.timedelta(seconds=119) < group[0].leased_until < timezone.now() + dt.timedelta(seconds=121)
    assert [item.index for item in services._claim(job, 1, 4, config)] == [4]  # the others are held
    assert services._claim(job, 1, 4, config) == []


@pytest.mark.django_db
def test_the_sweep_restarts_a_job_whose_messages_were_all_lost_and_leaves_cancelled_ones(
    owner: TenantFixture,
    queued: list[tuple[Any, ...]],
    pipeline_config: Any,
) -> None:
    config = pipeline_config(with_batch(chunk_size=10, stall_after_s=5))
    lost = batch_create(tenant=owner.tenant, data={"prompts": [Prompt(f"p{i}") for i in range(15)]}, config=config)
    cancelled = batch_create(tenant=owner.tenant, data={"prompts": [Prompt("c")]}, config=config)
    BatchJob.objects.filter(pk=cancelled.pk).update(status="cancelled")
    assert batch_recover(now=timezone.now() + dt.timedelta(seconds=6)) == 2
    assert [q[:3] for q in queued] == [(str(lost.id), 0, 9), (str(lost.id), 10, 19)]


@pytest.mark.django_db
def test_a_job_id_that_is_not_a_uuid_is_not_found(owner: TenantFixture) -> None:
    with pytest.raises(NotFound):
        batch_get(tenant_id=str(owner.tenant.id), job_id="../etc")


@pytest.mark.django_db
def test_removing_a_tenant_removes_its_jobs_and_items(owner: TenantFixture) -> None:
    submit(owner, {"prompts": ["a", "b"]})
    Tenant.objects.filter(pk=owner.tenant.pk).delete()
    assert not BatchJob.objects.exists() and not BatchItem.objects.exists()


@pytest.mark.django_db
def test_the_admin_shows_an_items_answer(owner: TenantFixture, staff: Any) -> None:
    job = submit(owner, {"prompts": ["shown to operators"], "priority": "low"})
    batch_run_chunk(job_id=job["id"], first=0, last=0)
    item = BatchItem.objects.get(job_id=job["id"])
    page = staff.get(f"/admin/batches/batchitem/{item.pk}/change/").content.decode()
    assert "shown to operators" in page and "Done" in page
    assert job["id"] in staff.get("/admin/batches/batchjob/", {"priority__exact": "low"}).content.decode()
    assert job["id"] not in staff.get("/admin/batches/batchjob/", {"priority__exact": "high"}).content.decode()
