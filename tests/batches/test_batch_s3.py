"""The ``s3`` destination, in this process against moto's standalone S3 server on
loopback (behind a proxy a test can cut): the bucket checked at submission, a small
job put whole, a large one uploaded in parts and visible only once complete, S3
lost in the middle of an upload and back (the next attempt starts over and the
object holds every line once), a leftover upload of a killed attempt aborted, and
the results checked line by line against the items."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from django.db.models import CharField, Value
from django.db.models.functions import Cast, Concat, LPad, Repeat
from django.utils import timezone

from batches import destinations, s3, services
from batches.models import BatchItem, BatchJob
from batches.services import Prompt, batch_create, batch_results, batch_run_chunk
from orchestrator_site.errors import InvalidRequest
from pipeline.config import get_config, set_config
from tests.batches.conftest import S3
from tests.batches.test_batch_services import with_batch
from tests.conftest import TenantFixture

pytestmark = pytest.mark.django_db


@pytest.fixture
def allowed(fakes: Any, queued: list[Any], deliveries_queued: list[str]) -> Iterator[None]:
    """The suite's config with loopback allowed as an S3 endpoint and 5 MB parts."""
    original = get_config()
    set_config(with_batch(webhook_allow=["127.0.0.1/32"], s3_part_mb=5, delivery_attempts=3, delivery_backoff_s=10))
    yield
    set_config(original)


def target(store: S3, **fields: Any) -> dict[str, Any]:
    return {"kind": "s3", "bucket": store.bucket, "prefix": "runs/", "endpoint_url": store.endpoint_url, **fields}


def completed_job(owner: TenantFixture, destination: dict[str, Any], count: int = 5, *, output_bytes: int = 0) -> BatchJob:
    prompts = [Prompt(f"line {i}", f"c-{i}") for i in range(count)]
    job = batch_create(tenant=owner.tenant, data={"prompts": prompts, "worker": "echo", "destinations": [destination]}, config=get_config())
    batch_run_chunk(job_id=str(job.id), first=0, last=count - 1)
    if output_bytes:  # answers this large, each its own
        numbered = LPad(Cast("index", output_field=CharField()), 6, Value("0"))
        BatchItem.objects.filter(job=job).update(output=Concat(numbered, Repeat(Value("x"), output_bytes), output_field=CharField()))
    job.refresh_from_db()
    assert job.status == "completed"
    return job


def lines(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in raw.decode().splitlines()]


def test_a_small_job_is_put_whole_and_matches_the_items(owner: TenantFixture, allowed: None, s3: S3) -> None:
    job = completed_job(owner, target(s3))
    services.batch_deliver(job_id=str(job.id))
    delivery = job.deliveries.get()
    assert (delivery.state, delivery.attempts, delivery.lines) == ("delivered", 1, 5)
    assert s3.keys() == [f"runs/{job.id}.jsonl"]
    written = lines(s3.body(f"runs/{job.id}.jsonl"))
    assert written == batch_results(job=job, after=-1, limit=10)  # line by line, the items' results
    assert [(w["index"], w["custom_id"], w["status"]) for w in written] == [(i, f"c-{i}", "done") for i in range(5)]
    assert "-" not in s3.client().head_object(Bucket=s3.bucket, Key=f"runs/{job.id}.jsonl")["ETag"]  # one PutObject, not parts
    (state,) = destinations.states(job)
    assert (state["kind"], state["bucket"], state["state"], state["lines"]) == ("s3", s3.bucket, "delivered", 5)


def test_a_large_job_goes_up_in_parts(owner: TenantFixture, allowed: None, s3: S3) -> None:
    job = completed_job(owner, target(s3, prefix=""), 160, output_bytes=75_000)  # about 12 MB: parts of 5, 5 and 2
    services.batch_deliver(job_id=str(job.id))
    assert job.deliveries.get().state == "delivered"
    key = f"{job.id}.jsonl"
    assert s3.client().head_object(Bucket=s3.bucket, Key=key)["ETag"].strip('"').endswith("-3")  # a multipart upload of 3 parts
    written = lines(s3.body(key))
    assert written == batch_results(job=job, after=-1, limit=200)
    assert [w["text"][:6] for w in written] == [f"{i:06d}" for i in range(160)]
    assert s3.uploads() == []


def test_s3_lost_mid_upload_leaves_no_object_and_the_next_attempt_writes_each_line_once(
    owner: TenantFixture, allowed: None, s3: S3, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = completed_job(owner, target(s3), 160, output_bytes=75_000)
    key = f"runs/{job.id}.jsonl"
    pages = services.result_pages

    def cut_midway(of: BatchJob, **options: Any) -> Iterator[list[dict[str, Any]]]:
        for number, page in enumerate(pages(of, limit=20)):
            if number == 5:  # 100 lines read: the first part (about 70) is up, the second is not
                s3.proxy.cut()
            yield page

    monkeypatch.setattr(services, "result_pages", cut_midway)
    now = timezone.now()
    (tried,) = destinations.deliver(job, get_config(), now=now)
    assert (tried.state, tried.attempts, tried.error["code"], tried.lines) == ("pending", 1, "delivery_failed", 0)
    assert tried.error["data"]["kind"] == "s3" and "Error" in tried.error["data"]["reason"]

    s3.proxy.restore()
    with pytest.raises(ClientError):  # the object does not exist: it appears only whole
        s3.client().head_object(Bucket=s3.bucket, Key=key)
    assert [u["Key"] for u in s3.uploads()] == [key]  # the abort could not reach S3 either
    monkeypatch.setattr(services, "result_pages", pages)

    assert destinations.deliver(job, get_config(), now=now) == []  # not due before its backoff
    (again,) = destinations.deliver(job, get_config(), now=now + dt.timedelta(seconds=11))
    assert (again.state, again.attempts, again.error, again.lines) == ("delivered", 2, None, 160)
    written = lines(s3.body(key))
    assert [w["index"] for w in written] == list(range(160))  # every item once
    assert written == batch_results(job=job, after=-1, limit=200)
    assert s3.uploads() == []  # the leftover upload was aborted


def test_s3_down_for_every_attempt_is_dead_lettered_then_replayed(owner: TenantFixture, allowed: None, s3: S3, staff: Any) -> None:
    job = completed_job(owner, target(s3))
    s3.proxy.cut()
    now = timezone.now()
    for attempt in range(3):
        (tried,) = destinations.deliver(job, get_config(), now=now + dt.timedelta(seconds=100 * attempt))
    assert (tried.state, tried.attempts) == ("failed", 3)
    job.refresh_from_db()
    assert job.status == "completed"  # the job did not fail with it
    page = staff.get(f"/admin/batches/batchjob/{job.id}/change/").content.decode()
    assert f"<td>s3://{s3.bucket}/runs/{job.id}.jsonl</td><td>failed</td><td>3</td>" in page
    s3.proxy.restore()
    staff.post("/admin/batches/batchjob/", {"action": "retry_deliveries", "_selected_action": [str(job.id)]})
    (replayed,) = destinations.deliver(job, get_config())
    assert (replayed.state, replayed.lines) == ("delivered", 5)
    assert lines(s3.body(f"runs/{job.id}.jsonl")) == batch_results(job=job, after=-1, limit=10)


def test_an_upload_left_open_by_a_killed_attempt_is_aborted(owner: TenantFixture, allowed: None, s3: S3) -> None:
    job = completed_job(owner, target(s3))
    key = f"runs/{job.id}.jsonl"
    s3.client().create_multipart_upload(Bucket=s3.bucket, Key=key)
    s3.client().create_multipart_upload(Bucket=s3.bucket, Key=key + ".other")  # another key: not ours to abort
    services.batch_deliver(job_id=str(job.id))
    assert [u["Key"] for u in s3.uploads()] == [key + ".other"]
    assert len(lines(s3.body(key))) == 5


def test_an_empty_job_writes_an_empty_object(owner: TenantFixture, allowed: None, s3: S3) -> None:
    job = batch_create(tenant=owner.tenant, data={"prompts": [Prompt("a", "")], "worker": "echo", "destinations": [target(s3)]}, config=get_config())
    BatchItem.objects.filter(job=job).delete()
    BatchJob.objects.filter(pk=job.pk).update(status="completed")
    job.refresh_from_db()
    (tried,) = destinations.deliver(job, get_config())
    assert (tried.state, tried.lines) == ("delivered", 0)
    assert s3.body(f"runs/{job.id}.jsonl") == b""


def test_the_bucket_and_fields_are_checked_at_submission(owner: TenantFixture, allowed: None, s3: S3) -> None:
    config = get_config()
    checked = destinations.validated([target(s3, region="us-east-1")], config)
    assert checked == [{"kind": "s3", "bucket": s3.bucket, "prefix": "runs/", "endpoint_url": s3.endpoint_url, "region": "us-east-1"}]
    refused = {
        "bucket": target(s3, bucket="no-such-bucket-here"),
        "bucket ": target(s3, bucket="Not_A_Bucket"),
        "prefix": target(s3, prefix="/rooted"),
        "region": target(s3, region="Mars 1"),
        "endpoint_url": target(s3, endpoint_url="ftp://127.0.0.1/"),
        "acl": target(s3, acl="public-read"),
    }
    for field, destination in refused.items():
        with pytest.raises(InvalidRequest) as caught:
            destinations.validated([destination], config)
        assert caught.value.data["field"] == f"destinations[0].{field.strip()}", destination
    with pytest.raises(InvalidRequest, match="does not exist"):
        destinations.validated([target(s3, bucket="no-such-bucket-here")], config)
    s3.proxy.cut()
    with pytest.raises(InvalidRequest, match="cannot be used"):  # S3 unreachable: the job is refused, not accepted blind
        destinations.validated([target(s3)], config)


def test_an_endpoint_on_a_private_address_is_refused_unless_allowed(owner: TenantFixture, fakes: Any, s3: S3) -> None:
    original = get_config()
    set_config(with_batch(webhook_allow=[]))
    try:
        with pytest.raises(InvalidRequest, match="not public") as caught:
            destinations.validated([target(s3)], get_config())
        assert caught.value.data["field"] == "destinations[0].endpoint_url"
    finally:
        set_config(original)


def test_an_endpoint_refused_since_submission_fails_the_attempt(owner: TenantFixture, allowed: None, s3: S3) -> None:
    job = completed_job(owner, target(s3))
    set_config(with_batch(webhook_allow=[]))  # the operator took loopback off the list since
    (tried,) = destinations.deliver(job, get_config())
    assert (tried.state, tried.error["code"]) == ("pending", "delivery_failed")
    assert "not public" in tried.error["message"] and s3.keys() == []


def test_the_api_takes_an_s3_destination_and_names_a_bad_bucket(owner: TenantFixture, allowed: None, s3: S3) -> None:
    body = {"prompts": ["one", "two"], "destinations": [target(s3)]}
    accepted = owner.client.post("/api/v1/batch", body, format="json")
    assert accepted.status_code == 201, accepted.json()
    assert accepted.json()["destinations"][0]["bucket"] == s3.bucket
    refused = owner.client.post("/api/v1/batch", {**body, "destinations": [target(s3, bucket="missing-bucket")]}, format="json")
    assert refused.status_code == 400
    assert refused.json()["error"]["data"]["field"] == "destinations[0].bucket"
    assert "does not exist" in refused.json()["error"]["message"]


def test_parts_split_at_lines_and_an_empty_job_still_has_one_body() -> None:
    rows = [{"index": i, "text": "y" * 10} for i in range(7)]
    line = len(services.ndjson(rows[:1]))
    parts = list(s3._parts(iter([rows[:3], rows[3:]]), part_bytes=2 * line))
    assert [count for _, count in parts] == [2, 2, 2, 1]
    assert b"".join(body for body, _ in parts) == services.ndjson(rows)
    assert list(s3._parts(iter([]), part_bytes=10)) == [(b"", 0)]
    exact = list(s3._parts(iter([rows[:2]]), part_bytes=2 * line))
    assert exact == [(services.ndjson(rows[:2]), 2)]  # no empty last part after an exact fit
