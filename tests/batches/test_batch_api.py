"""The batch API: submission and its validation, status, listing, cancelling, results;
a tenant never sees another's jobs."""

from __future__ import annotations

import json
import uuid
import warnings
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batches import services
from batches.api.serializers import PromptsField
from batches.models import BatchItem, BatchJob
from batches.services import batch_run_chunk
from pipeline.config import BatchConfig, PipelineSettings, get_config
from tests.conftest import TenantFixture

BATCH = "/api/v1/batch"


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """The chunks a submission queues (the broker itself is exercised by test_batch_worker)."""
    from batches.tasks import run_batch_chunk

    seen: list[tuple[Any, ...]] = []
    monkeypatch.setattr(run_batch_chunk, "apply_async", lambda args, **options: seen.append((*args, options["queue"], options["countdown"])))
    return seen


def submit(tenant: TenantFixture, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
    resp = tenant.client.post(BATCH, body, format="json")
    assert resp.status_code == status, resp.content
    return resp.json()


def ndjson(resp: Any) -> list[dict[str, Any]]:
    assert resp.status_code == 200 and resp["Content-Type"] == "application/x-ndjson"
    with warnings.catch_warnings():  # the test client reads the async stream synchronously
        warnings.simplefilter("ignore")
        body = b"".join(resp)
    return [json.loads(line) for line in body.decode().splitlines()]


@pytest.mark.django_db
def test_a_job_is_stored_with_its_items_and_its_chunks_queued(
    owner: TenantFixture, queued: list[tuple[Any, ...]], django_capture_on_commit_callbacks: Any, pipeline_config: Any
) -> None:
    pipeline_config(PipelineSettings(batch=BatchConfig(chunk_size=2)))
    with django_capture_on_commit_callbacks(execute=True):
        resp = owner.client.post(BATCH, {"prompts": ["one", {"prompt": "two", "custom_id": "b"}, "three"], "priority": "high", "max_tokens": 7}, format="json")
    assert resp.status_code == 201, resp.content
    job = resp.json()
    assert resp["Location"] == f"/api/v1/batch/{job['id']}"
    assert job["status"] == "queued" and job["priority"] == "high" and job["worker"] == "echo" and job["model"] == "echo-1"
    assert job["counts"] == {"total": 3, "done": 0, "failed": 0, "expired": 0, "pending": 3, "cancelled": 0} and job["progress"] == 0.0
    assert job["started_at"] is None and job["finished_at"] is None
    items = list(BatchItem.objects.filter(job_id=job["id"]).values_list("index", "prompt", "custom_id", "status"))
    assert items == [(0, "one", "", "pending"), (1, "two", "b", "pending"), (2, "three", "", "pending")]
    assert BatchJob.objects.get(pk=job["id"]).max_tokens == 7
    assert queued == [(job["id"], 0, 1, "batch.high", 0.0), (job["id"], 2, 3, "batch.high", 0.0)]


@pytest.mark.django_db
def test_nothing_is_queued_when_the_submission_rolls_back(owner: TenantFixture, queued: list[tuple[Any, ...]]) -> None:
    # Within the test's transaction the commit never comes: no message names a job a worker could not see.
    submit(owner, {"prompts": ["one"]})
    assert queued == []


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({}, "prompts", "required"),
        ({"prompts": []}, "prompts", "non-empty list"),
        ({"prompts": "one"}, "prompts", "non-empty list"),
        ({"prompts": ["ok", " "]}, "prompts", "item 1: prompt must be a non-empty string"),
        ({"prompts": [{"prompt": "a", "extra": 1}]}, "prompts", "item 0: must be a string or"),
        ({"prompts": [7]}, "prompts", "item 0: must be a string or"),
        ({"prompts": [{"prompt": "a", "custom_id": "x" * 65}]}, "prompts", "custom_id must be a string of at most 64"),
        ({"prompts": [{"prompt": "a", "custom_id": 3}]}, "prompts", "custom_id must be a string"),
        ({"prompts": [{"prompt": "a", "custom_id": "k"}, {"prompt": "b", "custom_id": "k"}]}, "prompts", "item 1: custom_id 'k' is used twice"),
        ({"prompts": ["a\x00b"]}, "prompts", "NUL"),
        ({"prompts": ["a"], "priority": "urgent"}, "priority", "not a valid choice"),
        ({"prompts": ["a"], "stop": ["1", "2", "3", "4", "5"]}, "stop", "at most 4 stop sequences"),
        ({"prompts": ["a"], "metadata": {"k": "v" * 5000}}, "metadata", "larger than 4 KiB"),
        ({"prompts": ["a"], "temperature": 3}, "temperature", "less than or equal to 2"),
    ],
)
def test_bad_submissions_name_the_field(owner: TenantFixture, fakes: Any, body: dict[str, Any], field: str, message: str) -> None:
    error = submit(owner, body, 400)["error"]
    assert error["code"] == "invalid_request" and field in error["data"]["fields"], error
    assert any(message in m for m in error["data"]["fields"][field]), error
    assert not BatchJob.objects.exists()


storable = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")  # what Postgres can hold
prompt_text = st.text(storable, min_size=1, max_size=50).filter(str.strip)


@given(st.lists(st.one_of(prompt_text, st.tuples(prompt_text, st.text(storable, max_size=64))), min_size=1, max_size=30))
def test_any_valid_prompts_are_taken_in_order_with_their_ids(raw: list[Any]) -> None:
    body = [{"prompt": p[0], "custom_id": f"{i}:{p[1]}"[:64]} if isinstance(p, tuple) else p for i, p in enumerate(raw)]
    prompts = PromptsField().to_internal_value(body)
    assert [p.text for p in prompts] == [b["prompt"] if isinstance(b, dict) else b for b in body]
    assert [p.custom_id for p in prompts] == [b["custom_id"] if isinstance(b, dict) else "" for b in body]


@pytest.mark.django_db
def test_many_bad_items_are_reported_ten_at_a_time(owner: TenantFixture) -> None:
    messages = submit(owner, {"prompts": [""] * 25}, 400)["error"]["data"]["fields"]["prompts"]
    assert len(messages) == 11 and messages[0].startswith("item 0:") and messages[9].startswith("item 9:") and messages[10] == "and 15 more"


@pytest.mark.django_db
def test_limits_come_from_the_config(owner: TenantFixture, pipeline_config: Any) -> None:
    pipeline_config(PipelineSettings(batch=BatchConfig(max_items=3, max_body_mb=1)))
    assert "at most 3 prompts" in submit(owner, {"prompts": ["a"] * 4}, 400)["error"]["data"]["fields"]["prompts"][0]
    too_big = owner.client.post(BATCH, {"prompts": ["x" * 600_000, "y" * 600_000]}, format="json")
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "prompt_too_large"
    assert "1048576 bytes" in too_big.json()["error"]["message"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"prompts": ["a"], "worker": "nope"}, "unknown_worker"),
        ({"prompts": ["a"], "worker": "openai", "model": "gpt-none"}, "unknown_model"),
        ({"prompts": ["a"], "max_tokens": 5000}, "invalid_request"),
    ],
)
def test_routing_is_checked_at_submission(owner: TenantFixture, body: dict[str, Any], code: str) -> None:
    assert submit(owner, body, 400)["error"]["code"] == code
    assert not BatchJob.objects.exists()


@pytest.mark.django_db
def test_malformed_json_and_no_key(owner: TenantFixture, anon: Any) -> None:
    resp = owner.client.post(BATCH, b"{nope", content_type="application/json")
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "malformed_json"
    assert anon.post(BATCH, {"prompts": ["a"]}, format="json").status_code == 401
    assert anon.get(BATCH).status_code == 401


@pytest.mark.django_db
def test_status_list_and_another_tenants_jobs(owner: TenantFixture, outsider: TenantFixture) -> None:
    first = submit(owner, {"prompts": ["a"]})
    second = submit(owner, {"prompts": ["b", "c"], "priority": "low"})
    assert owner.client.get(f"{BATCH}/{first['id']}").json() == first
    assert [j["id"] for j in owner.client.get(BATCH).json()["results"]] == [second["id"], first["id"]]
    assert [j["id"] for j in owner.client.get(BATCH, {"limit": 1, "offset": 1}).json()["results"]] == [first["id"]]
    assert owner.client.get(BATCH, {"limit": "x"}).json()["error"]["data"] == {"field": "limit"}
    assert outsider.client.get(BATCH).json() == {"count": 0, "next": None, "previous": None, "results": []}
    for resp in (
        outsider.client.get(f"{BATCH}/{first['id']}"),
        outsider.client.post(f"{BATCH}/{first['id']}/cancel"),
        outsider.client.get(f"{BATCH}/{first['id']}/results"),
        owner.client.get(f"{BATCH}/{uuid.uuid4()}"),
        owner.client.get(f"{BATCH}/not-a-uuid"),
    ):
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found", resp.content
    assert BatchJob.objects.get(pk=first["id"]).status == "queued"  # the outsider's cancel did nothing


@pytest.mark.django_db
def test_cancel_stops_a_job_and_leaves_a_finished_one_alone(owner: TenantFixture) -> None:
    job = submit(owner, {"prompts": ["a", "b"]})
    cancelled = owner.client.post(f"{BATCH}/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    # What it never ran is counted as cancelled, not as pending forever.
    assert cancelled["counts"]["cancelled"] == cancelled["counts"]["total"] - cancelled["counts"]["done"] - cancelled["counts"]["failed"] > 0
    assert cancelled["counts"]["pending"] == 0
    batch_run_chunk(job_id=job["id"], first=0, last=9)  # a message that was already queued
    assert set(BatchItem.objects.filter(job_id=job["id"]).values_list("status", flat=True)) == {"pending"}
    assert owner.client.post(f"{BATCH}/{job['id']}/cancel").json() == cancelled  # again: unchanged

    done = submit(owner, {"prompts": ["c"]})
    batch_run_chunk(job_id=done["id"], first=0, last=9)
    finished = owner.client.get(f"{BATCH}/{done['id']}").json()
    assert finished["status"] == "completed"
    assert owner.client.post(f"{BATCH}/{done['id']}/cancel").json() == finished


@pytest.mark.django_db
def test_results_are_json_lines_in_index_order_and_resume_after_an_index(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "RESULTS_PAGE", 2)  # several pages from Postgres
    job = submit(owner, {"prompts": ["zero", {"prompt": "one", "custom_id": "c1"}, "two", "three", "four"]})
    assert ndjson(owner.client.get(f"{BATCH}/{job['id']}/results")) == []  # nothing finished yet
    batch_run_chunk(job_id=job["id"], first=0, last=24)
    rows = ndjson(owner.client.get(f"{BATCH}/{job['id']}/results"))
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[1]["custom_id"] == "c1" and rows[1]["status"] == "done" and rows[1]["finish_reason"] in ("stop", "length")
    assert "one" in rows[1]["text"] and rows[1]["usage"]["total_tokens"] > 0 and "error" not in rows[1]
    assert [r["index"] for r in ndjson(owner.client.get(f"{BATCH}/{job['id']}/results", {"after": 2}))] == [3, 4]
    assert ndjson(owner.client.get(f"{BATCH}/{job['id']}/results", {"after": 4})) == []
    bad = owner.client.get(f"{BATCH}/{job['id']}/results", {"after": "two"})
    assert bad.status_code == 400 and bad.json()["error"]["data"] == {"field": "after"}


@pytest.mark.django_db
def test_a_failed_item_shows_its_error_in_the_results(owner: TenantFixture, fakes: Any) -> None:
    fakes.openai.mode = "400"
    job = submit(owner, {"prompts": ["refused"], "worker": "openai"})
    batch_run_chunk(job_id=job["id"], first=0, last=0)
    (row,) = ndjson(owner.client.get(f"{BATCH}/{job['id']}/results"))
    assert row["status"] == "failed" and row["error"]["code"] == "worker_rejected" and "text" not in row
    status = owner.client.get(f"{BATCH}/{job['id']}").json()
    assert (
        status["status"] == "completed"
        and status["counts"] == {"total": 1, "done": 0, "failed": 1, "expired": 0, "pending": 0, "cancelled": 0}
        and status["progress"] == 1.0
    )


@pytest.mark.django_db
def test_the_schema_documents_the_batch_endpoints(owner: TenantFixture) -> None:
    schema = owner.client.get("/api/v1/schema/", HTTP_ACCEPT="application/json").json()
    assert {"/api/v1/batch", "/api/v1/batch/{job_id}", "/api/v1/batch/{job_id}/cancel", "/api/v1/batch/{job_id}/results"} <= set(schema["paths"])
    prompts = schema["components"]["schemas"]["BatchInput"]["properties"]["prompts"]
    assert prompts["type"] == "array" and [kind["type"] for kind in prompts["items"]["oneOf"]] == ["string", "object"]
    assert get_config().batch.max_items == 50_000  # the documented default


@pytest.mark.django_db
@pytest.mark.parametrize(
    "options",
    [{"stop": ["1", "2", "3", "4", "5"]}, {"metadata": {"k": "v" * 5000}}, {"temperature": -1}, {"max_tokens": 0}, {"worker": "w" * 101}, {"model": ["a"]}],
)
def test_a_batch_refuses_the_same_options_as_a_single_request(owner: TenantFixture, options: dict[str, Any]) -> None:
    single = owner.client.post("/api/v1/infer", {"prompt": "p", **options}, format="json")
    batch = owner.client.post(BATCH, {"prompts": ["p"], **options}, format="json")
    assert single.status_code == batch.status_code == 400
    assert batch.json()["error"] == single.json()["error"]


@pytest.mark.django_db
def test_a_prompt_over_the_limit_fails_its_own_item_and_the_rest_run(owner: TenantFixture, fakes: Any) -> None:
    job = submit(owner, {"prompts": ["fine", {"prompt": "x" * 2001, "custom_id": "big"}, "also fine"]})
    assert job["status"] == "queued" and job["counts"] == {"total": 3, "done": 0, "failed": 1, "expired": 0, "pending": 2, "cancelled": 0}
    big = BatchItem.objects.get(job_id=job["id"], index=1)
    assert big.status == "failed" and big.error["code"] == "prompt_too_large" and big.error["message"] == "prompt is longer than 2000 characters"
    assert big.prompt == "" and big.custom_id == "big"  # the oversized text is not kept
    batch_run_chunk(job_id=job["id"], first=0, last=2)
    status = owner.client.get(f"{BATCH}/{job['id']}").json()
    assert status["status"] == "completed" and status["counts"] == {"total": 3, "done": 2, "failed": 1, "expired": 0, "pending": 0, "cancelled": 0}
    rows = ndjson(owner.client.get(f"{BATCH}/{job['id']}/results"))
    assert [(r["index"], r["status"]) for r in rows] == [(0, "done"), (1, "failed"), (2, "done")]
    assert rows[1]["error"]["code"] == "prompt_too_large" and rows[1]["custom_id"] == "big"


@pytest.mark.django_db
def test_a_job_whose_every_prompt_is_over_the_limit_is_complete_at_once(owner: TenantFixture, fakes: Any) -> None:
    job = submit(owner, {"prompts": ["x" * 2001, "y" * 2500]})
    assert job["status"] == "completed" and job["finished_at"] is not None and job["progress"] == 1.0
    assert job["counts"] == {"total": 2, "done": 0, "failed": 2, "expired": 0, "pending": 0, "cancelled": 0}
