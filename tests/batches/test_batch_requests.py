"""``POST /api/v1/batch`` with ``requests``, OpenAI batch request lines, instead of
``prompts``: each item keeps its own body, and the job keeps the native API's
priority, deadline and destinations; a bad request refuses the job, naming it, as
a bad prompt does."""

from __future__ import annotations

from typing import Any

import pytest

from batches.models import BatchJob
from batches.services import batch_results, batch_run_chunk
from pipeline.config import get_config, set_config
from tests.batches.test_batch_services import with_batch
from tests.conftest import TenantFixture

pytestmark = pytest.mark.django_db


def request(custom_id: str, *messages: tuple[str, str], model: str = "echo/echo-1", **body: Any) -> dict[str, Any]:
    turns = [{"role": role, "content": text} for role, text in messages]
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": {"model": model, "messages": turns, **body}}


def submit(owner: TenantFixture, **fields: Any) -> Any:
    return owner.client.post("/api/v1/batch", fields, format="json")


def test_requests_run_with_their_own_bodies_under_the_jobs_options(owner: TenantFixture, queued: list[Any], fakes: Any) -> None:
    first = request("a", ("user", "short one"), max_tokens=2)
    second = request("b", ("system", "s"), ("user", "earlier"), ("assistant", "yes"), ("user", "the last one"))
    resp = submit(owner, requests=[first, second], priority="high", deadline="2099-01-01T00:00:00Z")
    assert resp.status_code == 201, resp.content
    job = BatchJob.objects.get(pk=resp.json()["id"])
    assert (job.worker, job.model, job.priority, job.items_total) == ("echo", "echo-1", "high", 2)
    assert [item.request for item in job.items.order_by("index")] == [first["body"], second["body"]]
    batch_run_chunk(job_id=str(job.id), first=0, last=1)
    lines = batch_results(job=job, after=-1, limit=10)
    assert [(row["custom_id"], row["usage"]["completion_tokens"]) for row in lines] == [("a", 2), ("b", 8)]
    assert lines[1]["text"].startswith("the last one")  # the last user message is the prompt, the rest its history


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({}, "prompts", "required"),
        ({"prompts": ["p"], "requests": [request("a", ("user", "x"))]}, "requests", "not both"),
        ({"requests": [request("a", ("user", "x"))], "model": "echo-1"}, "model", "name their model"),
        ({"requests": []}, "requests", "empty"),
        ({"requests": [request("a", ("user", "x")), request("a", ("user", "y"))]}, "requests", "item 1: custom_id 'a' is used by an earlier line"),
        ({"requests": [request("a", ("user", "x")), request("b", ("user", "y"), model="echo/other")]}, "requests", "item 1: the model must be"),
        ({"requests": [request("a", ("user", "x"), temperature=9)]}, "requests", "item 0: some fields are invalid: temperature"),
        ({"requests": ["not an object", request("b", ("user", "y"))]}, "requests", "item 0: the line is not a JSON object"),
    ],
)
def test_bad_requests_refuse_the_job_naming_them(owner: TenantFixture, fakes: Any, fields: dict[str, Any], field: str, words: str) -> None:
    resp = submit(owner, **fields)
    assert resp.status_code == 400, resp.content
    error = resp.json()["error"]
    assert any(words in problem for problem in error["data"]["fields"][field]), error
    assert not BatchJob.objects.exists()


def test_at_most_ten_bad_requests_are_named(owner: TenantFixture, fakes: Any) -> None:
    bad = [request(f"r{i}", ("system", "no user")) for i in range(12)]
    problems = submit(owner, requests=[request("ok", ("user", "x")), *bad]).json()["error"]["data"]["fields"]["requests"]
    assert len(problems) == 11 and problems[0].startswith("item 1:") and problems[-1] == "and 2 more"


def test_a_job_of_more_requests_than_allowed_is_refused(owner: TenantFixture, fakes: Any) -> None:
    original = get_config()
    set_config(with_batch(max_items=2))
    try:
        resp = submit(owner, requests=[request(f"r{i}", ("user", "x")) for i in range(3)])
    finally:
        set_config(original)
    assert resp.status_code == 400 and "at most 2 requests" in resp.json()["error"]["data"]["fields"]["requests"][0]


def test_requests_that_name_no_model_are_refused(owner: TenantFixture, fakes: Any) -> None:
    resp = submit(owner, requests=[{"custom_id": "a", "body": {"messages": []}}])
    assert resp.status_code == 400 and resp.json()["error"]["data"]["field"] == "requests" and "names a model" in resp.json()["error"]["message"]
