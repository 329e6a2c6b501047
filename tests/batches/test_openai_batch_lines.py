"""The edges of OpenAI batches, in this process: any mix of good and bad lines keeps
the file's order, the status each job state shows, metadata's bounds, upload names,
what each item costs, the sweep's part, and files deleted along the way."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batches import openai_batches, services
from batches.models import BatchFile, BatchItem, BatchJob, OpenAIBatch
from batches.services import batch_recover, batch_run_chunk
from pipeline.config import get_config
from pipeline.models import UsageEntry
from tests.batches.test_openai_batches import MODEL, content, create, deliver, fetch, job_of, jsonl, line, run_all, upload
from tests.conftest import TenantFixture

pytestmark = pytest.mark.django_db

# What a line may be, and whether it runs: (text for custom_id N, runs?).
KINDS = {
    "good": (lambda n: line(f"c{n}", f"question {n}", model="echo/echo-1"), True),
    "not-json": (lambda n: "{" + f'"custom_id": "c{n}"', False),
    "wrong-url": (lambda n: line(f"c{n}", "x", model="echo/echo-1", url="/v1/completions"), False),
    "bad-body": (lambda n: line(f"c{n}", "x", model="echo/echo-1", top_p=3), False),
    "other-model": (lambda n: line(f"c{n}", "x", model="echo/other"), False),
}


@pytest.fixture
def finished(fakes: Any, queued: list[Any], deliveries_queued: list[str]) -> list[str]:
    return deliveries_queued


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=12))
def test_any_mix_of_lines_keeps_the_files_order(owner: TenantFixture, finished: list[str], kinds: list[str]) -> None:
    text = "\n".join([KINDS["good"][0](0), *(KINDS[kind][0](n) for n, kind in enumerate(kinds, start=1))])  # the first names the model
    batch = create(owner, text)
    run_all(batch)
    deliver(finished)
    finished.clear()
    done = fetch(owner, batch)
    runs = [0, *(n for n, kind in enumerate(kinds, start=1) if KINDS[kind][1])]
    refused = [n for n, kind in enumerate(kinds, start=1) if not KINDS[kind][1]]
    assert done["status"] == "completed" and done["request_counts"] == {"total": len(kinds) + 1, "completed": len(runs), "failed": len(refused)}
    output = jsonl(content(owner, done["output_file_id"]))
    assert [row["custom_id"] for row in output] == [f"c{n}" for n in runs]
    assert all(row["response"]["body"]["choices"][0]["message"]["content"].startswith(f"question {n}") for row, n in zip(output, runs, strict=True))
    errors = jsonl(content(owner, done["error_file_id"])) if refused else []
    assert done["error_file_id"] is None if not refused else [row["response"]["body"]["error"]["line"] for row in errors] == [n + 1 for n in refused]
    assert [row["custom_id"] for row in errors] == [None if kinds[n - 1] == "not-json" else f"c{n}" for n in refused]


@pytest.mark.parametrize(
    ("status", "finalized", "expired", "shown", "stamps"),
    [
        (BatchJob.Status.QUEUED, False, 0, "in_progress", {"in_progress_at"}),
        (BatchJob.Status.RUNNING, False, 0, "in_progress", {"in_progress_at"}),
        (BatchJob.Status.COMPLETED, False, 0, "finalizing", {"in_progress_at", "finalizing_at"}),
        (BatchJob.Status.COMPLETED, True, 0, "completed", {"in_progress_at", "finalizing_at", "completed_at"}),
        (BatchJob.Status.COMPLETED, True, 2, "expired", {"in_progress_at", "finalizing_at", "expired_at"}),
        (BatchJob.Status.CANCELLED, False, 0, "cancelling", {"in_progress_at", "cancelling_at"}),
        (BatchJob.Status.CANCELLED, True, 0, "cancelled", {"in_progress_at", "cancelling_at", "cancelled_at"}),
    ],
)
def test_each_job_state_shows_as_openais_status_with_its_times(
    owner: TenantFixture, finished: list[str], status: str, finalized: bool, expired: int, shown: str, stamps: set[str]
) -> None:
    batch = create(owner, line("a", "x"))
    now = timezone.now()
    ended = status not in BatchJob.ACTIVE
    BatchJob.objects.filter(pk=job_of(batch).pk).update(status=status, items_expired=expired, finished_at=now if ended else None)
    OpenAIBatch.objects.filter(pk=batch["id"]).update(finalized_at=now if finalized else None)
    shown_batch = fetch(owner, batch)
    assert shown_batch["status"] == shown
    times = ("in_progress_at", "finalizing_at", "completed_at", "expired_at", "cancelling_at", "cancelled_at", "failed_at")
    assert {name for name in times if shown_batch[name] is not None} == stamps
    assert all(isinstance(shown_batch[name], int) for name in stamps)


@pytest.mark.parametrize(
    ("metadata", "ok"),
    [
        ({f"k{i}": "v" for i in range(16)}, True),
        ({"k" * 64: "v" * 512}, True),
        ({"k" * 65: "v"}, False),
        ({"k": "v" * 513}, False),
        ({"k": None}, False),
        (["k", "v"], False),
        (None, True),
    ],
)
def test_metadata_within_openais_bounds(owner: TenantFixture, finished: list[str], metadata: Any, ok: bool) -> None:
    file_id = upload(owner, line("a", "x")).json()["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h", "metadata": metadata}
    resp = owner.client.post("/v1/batches", body, format="json")
    assert resp.status_code == (200 if ok else 400), resp.content
    if ok:
        assert resp.json()["metadata"] == (metadata or None)
    else:
        assert resp.json()["error"]["param"] == "metadata"


@pytest.mark.parametrize(("name", "kept"), [("in.jsonl", "in.jsonl"), ("a\x00b.jsonl", "ab.jsonl"), ("x" * 300 + ".jsonl", ("x" * 300 + ".jsonl")[-255:])])
def test_an_uploads_name_is_kept_storable(owner: TenantFixture, name: str, kept: str) -> None:
    resp = upload(owner, line("a", "x"), name=name)
    assert resp.status_code == 200 and resp.json()["filename"] == kept


def test_a_line_over_the_prompt_limit_fails_alone_with_413(owner: TenantFixture, finished: list[str]) -> None:
    limit = get_config().limits.max_prompt_chars
    history = [{"role": "user", "content": "a" * (limit // 2)}, {"role": "assistant", "content": "b" * (limit // 2)}, {"role": "user", "content": "c"}]
    long = json.dumps({"custom_id": "long", "method": "POST", "url": "/v1/chat/completions", "body": {"model": MODEL, "messages": history}})
    batch = create(owner, line("short", "x") + "\n" + long)
    assert batch["request_counts"]["failed"] == 1
    item = job_of(batch).items.get(custom_id="long")
    assert item.status == BatchItem.Status.FAILED and item.request is None and item.prompt == ""  # its text is not kept
    run_all(batch)
    deliver(finished)
    (error,) = jsonl(content(owner, fetch(owner, batch)["error_file_id"]))
    assert error["response"]["status_code"] == 413 and error["response"]["body"]["error"]["code"] == "prompt_too_large"


def test_logprobs_asked_for_are_in_the_output_line(owner: TenantFixture, finished: list[str]) -> None:
    batch = create(owner, line("lp", "x", logprobs=True, top_logprobs=2))
    run_all(batch)
    item = job_of(batch).items.get()
    assert item.detail is not None and len(item.detail["logprobs"]) > 0 and "tool_calls" not in item.detail
    deliver(finished)
    (row,) = jsonl(content(owner, fetch(owner, batch)["output_file_id"]))
    logprobs = row["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert logprobs == item.detail["logprobs"] and len(logprobs[0]["top_logprobs"]) == 2


def test_plain_answers_keep_no_detail(owner: TenantFixture, finished: list[str]) -> None:
    batch = create(owner, line("plain", "x"))
    run_all(batch)
    assert job_of(batch).items.get().detail is None
    deliver(finished)
    (row,) = jsonl(content(owner, fetch(owner, batch)["output_file_id"]))
    assert row["response"]["body"]["choices"][0]["logprobs"] is None and "tool_calls" not in row["response"]["body"]["choices"][0]["message"]


def test_each_item_is_charged_and_in_the_ledger_at_its_own_size(owner: TenantFixture, finished: list[str]) -> None:
    short = line("short", "hi", model="echo_priced/echo-priced-1", max_tokens=2)
    long = line("long", "hello there", model="echo_priced/echo-priced-1", max_tokens=8)
    batch = create(owner, short + "\n" + long)
    run_all(batch)
    job = job_of(batch)
    rows = {row.request_id: row for row in UsageEntry.objects.filter(tenant=owner.tenant)}
    assert set(rows) == {f"{job.id.hex}-0", f"{job.id.hex}-1"}
    assert (rows[f"{job.id.hex}-0"].completion_tokens, rows[f"{job.id.hex}-1"].completion_tokens) == (2, 8)
    assert rows[f"{job.id.hex}-1"].cost_usd == Decimal("0.008") and rows[f"{job.id.hex}-0"].cost_usd == Decimal("0.002")


def test_the_sweep_queues_the_files_of_an_ended_batch_whose_message_was_lost(owner: TenantFixture, finished: list[str]) -> None:
    batch = create(owner, line("a", "x"))
    run_all(batch)
    job = job_of(batch)
    assert finished == [str(job.id)]
    finished.clear()  # the message lost
    batch_recover()
    assert finished == [str(job.id)]
    deliver(finished)
    finished.clear()
    batch_recover()
    assert finished == [] and fetch(owner, batch)["status"] == "completed"


def test_a_batch_expired_by_the_sweep_queues_its_files(owner: TenantFixture, finished: list[str]) -> None:
    batch = create(owner, line("a", "x") + "\n" + line("b", "y"))
    job = job_of(batch)
    batch_recover(now=job.deadline + dt.timedelta(seconds=1))
    assert str(job.id) in finished
    deliver(finished)
    done = fetch(owner, batch)
    assert done["status"] == "expired" and done["output_file_id"] is None and done["request_counts"]["failed"] == 2


def test_an_output_file_deleted_leaves_its_batch_without_it(owner: TenantFixture, finished: list[str]) -> None:
    batch = create(owner, line("a", "x"))
    run_all(batch)
    deliver(finished)
    output = fetch(owner, batch)["output_file_id"]
    assert owner.client.delete(f"/v1/files/{output}").json()["deleted"] is True
    after = fetch(owner, batch)
    assert after["output_file_id"] is None and after["status"] == "completed" and not BatchFile.objects.filter(pk=output).exists()
    assert owner.client.delete(f"/v1/files/{output}").status_code == 404


def test_finalize_leaves_a_job_of_the_native_api_alone(owner: TenantFixture, finished: list[str]) -> None:
    job = services.batch_create(tenant=owner.tenant, data={"prompts": [services.Prompt("native")], "worker": "echo"}, config=get_config())
    batch_run_chunk(job_id=str(job.id), first=0, last=0)
    job.refresh_from_db()
    assert job.status == "completed" and finished == []  # no destination, no batch: nothing to deliver
    assert openai_batches.finalize(job) is False and not BatchFile.objects.exists()


def test_a_cancelled_job_with_nothing_running_is_finalized_at_once(owner: TenantFixture, finished: list[str]) -> None:
    batch = create(owner, line("a", "x") + "\n" + line("b", "y"))
    owner.client.post(f"/v1/batches/{batch['id']}/cancel")
    deliver(finished)
    done = fetch(owner, batch)
    assert done["status"] == "cancelled" and done["output_file_id"] is None and done["request_counts"] == {"total": 2, "completed": 0, "failed": 0}
    assert [row["custom_id"] for row in jsonl(content(owner, done["error_file_id"]))] == ["a", "b"]


# ---- a line's body, as the provider gets it ------------------------------------------


def test_a_field_the_worker_cannot_honour_fails_its_line_by_name(owner: TenantFixture, finished: list[str]) -> None:
    model = "anthropic/claude-fake"
    batch = create(
        owner, line("plain", "x", model=model) + "\n" + line("seeded", "x", model=model, seed=7) + "\n" + line("big", "x", model=model, max_tokens=10**9)
    )
    errors = {item.custom_id: item.error for item in job_of(batch).items.exclude(status=BatchItem.Status.PENDING)}
    assert set(errors) == {"seeded", "big"}
    assert errors["seeded"]["code"] == "unsupported_parameter" and errors["seeded"]["data"]["field"] == "seed"
    assert errors["big"]["code"] == "invalid_request" and "max_tokens" in errors["big"]["data"]["fields"]


def test_an_anthropic_line_reaches_the_provider_in_its_own_shape(owner: TenantFixture, fakes: Any, finished: list[str]) -> None:
    messages = [{"role": "system", "content": "in French"}, {"role": "user", "content": "bonjour?"}]
    text = json.dumps(
        {
            "custom_id": "fr",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "anthropic/claude-fake", "messages": messages, "max_tokens": 6, "stream": True},
        }
    )
    before = len(fakes.anthropic.requests)
    batch = create(owner, text)
    run_all(batch)
    (sent,) = [r["body"] for r in fakes.anthropic.requests[before:]]
    assert sent["model"] == "claude-fake" and sent["max_tokens"] == 6 and "in French" in json.dumps(sent["system"])
    assert sent["messages"][-1] == {"role": "user", "content": "bonjour?"}
    deliver(finished)
    (row,) = jsonl(content(owner, fetch(owner, batch)["output_file_id"]))
    assert row["response"]["body"]["model"] == "anthropic/claude-fake" and row["response"]["body"]["choices"][0]["message"]["content"]


def test_a_line_past_the_budget_is_a_402_line(owner: TenantFixture, finished: list[str]) -> None:
    from pipeline.models import Budget

    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("0.01"), period="month")
    model = "echo_priced/echo-priced-1"
    batch = create(owner, line("first", "a", model=model, max_tokens=8) + "\n" + line("second", "b", model=model, max_tokens=8))
    run_all(batch)
    deliver(finished)
    done = fetch(owner, batch)
    assert done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    (error,) = jsonl(content(owner, done["error_file_id"]))
    assert error["custom_id"] == "second" and error["response"]["status_code"] == 402
    assert error["response"]["body"]["error"]["code"] == "insufficient_quota" and error["response"]["body"]["error"]["type"] == "insufficient_quota"


@pytest.mark.django_db(transaction=True)
def test_two_workers_finalizing_at_once_write_one_set_of_files(owner: TenantFixture, fakes: Any, queued: list[Any], deliveries_queued: list[str]) -> None:
    import threading

    from django.db import connection

    batch = create(owner, "\n".join(line(f"r{i}", f"q{i}") for i in range(30)))
    run_all(batch)
    job = job_of(batch)
    results: list[bool] = []
    start = threading.Barrier(2)

    def finalize() -> None:
        try:
            start.wait()
            results.append(openai_batches.finalize(job))
        finally:
            connection.close()

    threads = [threading.Thread(target=finalize) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True, True]  # the second saw the first's files
    assert BatchFile.objects.filter(purpose="batch_output").count() == 1 and len(jsonl(content(owner, fetch(owner, batch)["output_file_id"]))) == 30


# ---- files as editors and scripts write them ---------------------------------------


@pytest.mark.parametrize(
    "framing",
    [
        pytest.param(lambda lines: "\r\n".join(lines) + "\r\n", id="crlf"),
        pytest.param(lambda lines: "\ufeff" + "\n".join(lines), id="byte-order-mark"),
        pytest.param(lambda lines: "\n\n" + "\n\n".join(lines) + "\n\n\n", id="blank-lines"),
        pytest.param(lambda lines: "\n".join(lines), id="no-final-newline"),
    ],
)
def test_line_endings_and_marks_do_not_change_the_requests(owner: TenantFixture, finished: list[str], framing: Any) -> None:
    batch = create(owner, framing([line("a", "x"), line("b", "y")]))
    assert batch["request_counts"] == {"total": 2, "completed": 0, "failed": 0}
    assert list(job_of(batch).items.order_by("index").values_list("custom_id", "prompt")) == [("a", "x"), ("b", "y")]


def test_a_large_upload_comes_back_byte_for_byte(owner: TenantFixture) -> None:
    raw = b"".join(line(f"r{i}", "y" * 900).encode() + b"\n" for i in range(2600))  # about 2.6 MB: three parts
    file = upload(owner, raw).json()
    assert file["bytes"] == len(raw) and content(owner, file["id"]) == raw


def test_one_file_makes_two_independent_batches(owner: TenantFixture, finished: list[str]) -> None:
    file_id = upload(owner, line("a", "x")).json()["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    first, second = (owner.client.post("/v1/batches", body, format="json").json() for _ in range(2))
    assert first["id"] != second["id"] and first["input_file_id"] == second["input_file_id"] == file_id
    run_all(first)
    assert (fetch(owner, first)["request_counts"]["completed"], fetch(owner, second)["request_counts"]["completed"]) == (1, 0)


def test_a_route_group_is_not_a_batchs_model(owner: TenantFixture, finished: list[str]) -> None:
    group = next(iter(get_config().routes))
    file_id = upload(owner, line("a", "x", model=group)).json()["id"]
    resp = owner.client.post("/v1/batches", {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}, format="json")
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "model_not_found" and resp.json()["error"]["param"] == "model"


def test_lists_with_nothing_in_them(owner: TenantFixture) -> None:
    for path in ("/v1/batches", "/v1/files"):
        assert owner.client.get(path).json() == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


def test_output_files_are_listed_by_purpose(owner: TenantFixture, finished: list[str]) -> None:
    batch = create(owner, line("a", "x") + "\n" + line("b", "y", temperature=7))
    run_all(batch)
    deliver(finished)
    done = fetch(owner, batch)
    listed = [f["id"] for f in owner.client.get("/v1/files", {"purpose": "batch_output"}).json()["data"]]
    assert sorted(listed) == sorted([done["output_file_id"], done["error_file_id"]])
    assert [f["id"] for f in owner.client.get("/v1/files", {"purpose": "batch"}).json()["data"]] == [batch["input_file_id"]]


def test_a_batch_shows_when_it_started(owner: TenantFixture, finished: list[str]) -> None:
    batch = create(owner, line("a", "x") + "\n" + line("b", "y"))
    assert batch["in_progress_at"] == batch["created_at"]  # taken at once: nothing to validate later
    later = timezone.now() + dt.timedelta(seconds=5)
    BatchJob.objects.filter(pk=job_of(batch).pk).update(started_at=later)
    assert fetch(owner, batch)["in_progress_at"] == int(later.timestamp())


def test_a_batch_runs_at_low_priority_until_its_window_nears_its_end(owner: TenantFixture, finished: list[str]) -> None:
    from batches import urgency

    batch = create(owner, line("a", "x"))
    job = job_of(batch)
    assert job.priority == BatchJob.Priority.LOW and job.deadline is not None
    assert abs((job.deadline - job.created_at).total_seconds() - 24 * 3600) < 1
    native = services.batch_create(tenant=owner.tenant, data={"prompts": [services.Prompt("native")], "worker": "echo"}, config=get_config())
    urgency.enter(job)
    urgency.enter(native)
    near = get_config().batch.deadline_near_s
    try:
        assert urgency.more_urgent(native, near) is None  # a default job goes first
        assert urgency.more_urgent(native, near, now=job.deadline.timestamp() - near / 2) == str(job.id)  # unless its window is closing
    finally:
        urgency.leave(job.id)
        urgency.leave(native.id)


def test_cancelling_a_finished_batch_changes_nothing(owner: TenantFixture, finished: list[str]) -> None:
    batch = create(owner, line("a", "x"))
    run_all(batch)
    deliver(finished)
    before = fetch(owner, batch)
    after = owner.client.post(f"/v1/batches/{batch['id']}/cancel").json()
    assert after == before and after["status"] == "completed"


def test_each_output_line_has_its_own_id_and_the_time_it_was_answered(owner: TenantFixture, finished: list[str]) -> None:
    batch = create(owner, "\n".join(line(f"r{i}", f"q{i}") for i in range(3)))
    run_all(batch)
    deliver(finished)
    rows = jsonl(content(owner, fetch(owner, batch)["output_file_id"]))
    items = list(job_of(batch).items.order_by("index"))
    assert [row["id"] for row in rows] == [f"batch_req_{item.pk}" for item in items] and len({row["id"] for row in rows}) == 3
    assert [row["response"]["body"]["created"] for row in rows] == [int(item.finished_at.timestamp()) for item in items if item.finished_at]
    assert [row["response"]["body"]["id"] for row in rows] == [f"chatcmpl-{job_of(batch).id.hex}-{i}" for i in range(3)]


def test_a_line_continues_after_its_tool_ran(owner: TenantFixture, fakes: Any, finished: list[str]) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "refunds"}'}}
    messages = [
        {"role": "user", "content": "what is the refund window?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "30 days"},
    ]
    text = json.dumps({"custom_id": "after-tool", "method": "POST", "url": "/v1/chat/completions", "body": {"model": MODEL, "messages": messages}})
    before = len(fakes.openai.requests)
    batch = create(owner, text)
    run_all(batch)
    (sent,) = [r["body"] for r in fakes.openai.requests[before:]]
    assert sent["messages"][-2]["tool_calls"][0]["id"] == "call_1" and sent["messages"][-1] == {"role": "tool", "tool_call_id": "call_1", "content": "30 days"}
    deliver(finished)
    (row,) = jsonl(content(owner, fetch(owner, batch)["output_file_id"]))
    assert "30 days" in row["response"]["body"]["choices"][0]["message"]["content"]


def test_a_file_of_nothing_but_a_byte_order_mark_has_no_requests(owner: TenantFixture) -> None:
    file_id = upload(owner, "\ufeff").json()["id"]
    resp = owner.client.post("/v1/batches", {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}, format="json")
    assert resp.status_code == 400 and resp.json()["error"]["message"] == "the input file has no requests"


def test_a_body_that_is_not_an_object_fails_its_line(owner: TenantFixture, finished: list[str]) -> None:
    odd = json.dumps({"custom_id": "odd", "method": "POST", "url": "/v1/chat/completions", "body": "say hi"})
    batch = create(owner, line("a", "x") + "\n" + odd)
    assert job_of(batch).items.get(custom_id="odd").error["data"] == {"field": "body", "line": 2}


def test_a_line_the_config_it_runs_on_refuses_fails_when_it_runs(owner: TenantFixture, finished: list[str], pipeline_config: Any) -> None:
    batch = create(owner, line("big", "x", max_tokens=50) + "\n" + line("small", "y", max_tokens=5))
    config = get_config()
    pipeline_config(config.model_copy(update={"limits": config.limits.model_copy(update={"max_tokens_limit": 10})}))  # lowered since
    run_all(batch)
    items = {item.custom_id: item for item in job_of(batch).items.all()}
    assert items["small"].status == BatchItem.Status.DONE and items["big"].status == BatchItem.Status.FAILED
    assert items["big"].error["code"] == "invalid_request" and "max_tokens" in items["big"].error["data"]["fields"]


def test_an_output_file_of_many_pages_is_whole_and_in_order(owner: TenantFixture, finished: list[str]) -> None:
    count = openai_batches.PAGE * 2 + 37
    batch = create(owner, "\n".join(line(f"r{i}", f"q{i}") for i in range(count)))
    job = job_of(batch)
    now = timezone.now()
    job.items.update(status=BatchItem.Status.DONE, output="answered", finish_reason="stop", usage={"total_tokens": 1}, finished_at=now)
    BatchJob.objects.filter(pk=job.pk).update(items_done=count, status=BatchJob.Status.COMPLETED, finished_at=now)
    job.refresh_from_db()
    assert openai_batches.finalize(job) is True
    raw = content(owner, fetch(owner, batch)["output_file_id"])  # its length checked against bytes, counted at finalizing
    rows = jsonl(raw)
    assert [row["custom_id"] for row in rows] == [f"r{i}" for i in range(count)]


@pytest.mark.parametrize(
    ("stored", "status", "kind", "code"),
    [
        ({"code": "worker_rate_limited", "message": "slow down", "data": {"retry_after": 3}}, 429, "rate_limit_error", "worker_rate_limited"),
        ({"code": "worker_timeout", "message": "no answer", "data": {}}, 504, "server_error", "worker_timeout"),
        ({"code": "circuit_open", "message": "open", "data": {"worker": "openai"}}, 503, "server_error", "circuit_open"),
        ({"code": "budget_exceeded", "message": "spent", "data": {}}, 402, "insufficient_quota", "insufficient_quota"),
        ({"code": "context_length_exceeded", "message": "too long", "data": {}}, 400, "invalid_request_error", "context_length_exceeded"),
        (None, 500, "server_error", "internal_error"),
    ],
)
def test_a_failed_items_error_is_openais_status_and_body(owner: TenantFixture, finished: list[str], stored: Any, status: int, kind: str, code: str) -> None:
    batch = create(owner, line("a", "x"))
    job = job_of(batch)
    job.items.update(status=BatchItem.Status.FAILED, error=stored, attempts=1, finished_at=timezone.now())
    BatchJob.objects.filter(pk=job.pk).update(items_failed=1, status=BatchJob.Status.COMPLETED, finished_at=timezone.now())
    deliver([str(job.id)])
    (row,) = jsonl(content(owner, fetch(owner, batch)["error_file_id"]))
    assert row["response"]["status_code"] == status and row["error"] is None
    assert (row["response"]["body"]["error"]["type"], row["response"]["body"]["error"]["code"]) == (kind, code)


def test_an_upload_without_a_name_gets_one(owner: TenantFixture) -> None:
    file = openai_batches.upload(tenant=owner.tenant, purpose="batch", filename="", content=b"{}", config=get_config())
    assert file.filename == "upload.jsonl" and file.bytes == 2 and bytes(file.content or b"") == b"{}"


def test_the_admin_cancels_an_openai_batch_and_its_files_follow(staff: Any, owner: TenantFixture, finished: list[str]) -> None:
    batch = create(owner, line("a", "x") + "\n" + line("b", "y"))
    job = job_of(batch)
    batch_run_chunk(job_id=str(job.id), first=0, last=0)
    staff.post("/admin/batches/batchjob/", {"action": "cancel", "_selected_action": [str(job.id)]}, follow=True)
    assert finished == [str(job.id)]
    deliver(finished)
    done = fetch(owner, batch)
    assert done["status"] == "cancelled" and done["request_counts"]["completed"] == 1
    assert [(r["custom_id"], r["error"]["code"]) for r in jsonl(content(owner, done["error_file_id"]))] == [("b", "batch_cancelled")]


def test_a_files_content_is_read_a_part_at_a_time() -> None:
    """Under ASGI a sync iterator is read whole before the first byte: the content view
    hands Django an async one that reads a page only when the client is ready for it."""
    from asgiref.sync import async_to_sync

    from batches.api.views import streamed

    read: list[int] = []

    def parts() -> Any:
        for page in range(3):
            read.append(page)
            yield bytes([page])

    async def first_then_rest() -> tuple[bytes, list[int], list[bytes]]:
        stream = streamed(parts())
        first = await anext(stream)
        seen = list(read)
        return first, seen, [part async for part in stream]

    assert async_to_sync(first_then_rest)() == (b"\x00", [0], [b"\x01", b"\x02"]) and read == [0, 1, 2]
