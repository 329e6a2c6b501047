"""OpenAI's Files and Batch APIs in this process, against the real Postgres and the
OpenAI fake: uploads, a batch whose lines run with their own bodies, bad lines
reported line by line in the error file, the statuses from in_progress to
completed, expired and cancelled, the files' lines in OpenAI's format, and the
refusals of a whole request in OpenAI's error shape."""

from __future__ import annotations

import datetime as dt
import json
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from batches import openai_batches, services
from batches.models import BatchFile, BatchItem, BatchJob, OpenAIBatch
from batches.services import batch_run_chunk
from pipeline.config import get_config, set_config
from tests.batches.test_batch_services import with_batch
from tests.conftest import TenantFixture

pytestmark = pytest.mark.django_db

MODEL = "openai/gpt-fake"


def line(custom_id: str, content: str, *, model: str = MODEL, url: str = "/v1/chat/completions", **body: Any) -> str:
    request = {"model": model, "messages": [{"role": "user", "content": content}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": request})


def upload(owner: TenantFixture, text: str | bytes, *, purpose: str = "batch", name: str = "requests.jsonl") -> Any:
    raw = text.encode() if isinstance(text, str) else text
    return owner.client.post("/v1/files", {"file": SimpleUploadedFile(name, raw), "purpose": purpose}, format="multipart")


def create(owner: TenantFixture, text: str, **fields: Any) -> dict[str, Any]:
    file_id = upload(owner, text).json()["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **fields}
    resp = owner.client.post("/v1/batches", body, format="json")
    assert resp.status_code == 200, resp.content
    return resp.json()


def job_of(batch: dict[str, Any]) -> BatchJob:
    return OpenAIBatch.objects.get(pk=batch["id"]).job


def run_all(batch: dict[str, Any]) -> None:
    job = job_of(batch)
    batch_run_chunk(job_id=str(job.id), first=0, last=job.items_total)


def fetch(owner: TenantFixture, batch: dict[str, Any]) -> dict[str, Any]:
    resp = owner.client.get(f"/v1/batches/{batch['id']}")
    assert resp.status_code == 200, resp.content
    return resp.json()


def content(owner: TenantFixture, file_id: str) -> bytes:
    resp = owner.client.get(f"/v1/files/{file_id}/content")
    assert resp.status_code == 200
    with warnings.catch_warnings():  # the test client reads the async stream synchronously
        warnings.simplefilter("ignore")
        raw = b"".join(resp)
    assert int(resp["Content-Length"]) == len(raw) == owner.client.get(f"/v1/files/{file_id}").json()["bytes"]
    return raw


def jsonl(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(row) for row in raw.decode().splitlines()]


@pytest.fixture
def finished(owner: TenantFixture, fakes: Any, queued: list[Any], deliveries_queued: list[str]) -> Iterator[list[str]]:
    """The jobs whose output files were queued; the test finalizes them with ``deliver``."""
    yield deliveries_queued


def deliver(queued_jobs: list[str]) -> None:
    for job_id in dict.fromkeys(queued_jobs):
        services.batch_deliver(job_id=job_id)


# ---- files ------------------------------------------------------------------------


def test_an_upload_is_kept_as_it_came_and_listed(owner: TenantFixture, outsider: TenantFixture) -> None:
    text = line("a", "one") + "\n" + line("b", "two") + "\n"
    resp = upload(owner, text, name="mine.jsonl")
    assert resp.status_code == 200, resp.content
    file = resp.json()
    assert file["id"].startswith("file-") and file["object"] == "file" and file["purpose"] == "batch"
    assert file["bytes"] == len(text.encode()) and file["filename"] == "mine.jsonl" and isinstance(file["created_at"], int)
    assert owner.client.get(f"/v1/files/{file['id']}").json() == file
    assert content(owner, file["id"]) == text.encode()
    second = upload(owner, line("c", "three")).json()
    listed = owner.client.get("/v1/files").json()
    assert listed["object"] == "list" and [f["id"] for f in listed["data"]] == [second["id"], file["id"]] and not listed["has_more"]
    page = owner.client.get("/v1/files", {"limit": 1}).json()
    assert [f["id"] for f in page["data"]] == [second["id"]] and page["has_more"] and page["last_id"] == second["id"]
    rest = owner.client.get("/v1/files", {"limit": 1, "after": second["id"]}).json()
    assert [f["id"] for f in rest["data"]] == [file["id"]] and not rest["has_more"]
    assert owner.client.get("/v1/files", {"purpose": "batch_output"}).json()["data"] == []
    missing = outsider.client.get(f"/v1/files/{file['id']}")  # another tenant's file does not exist
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    unseen = outsider.client.get(f"/v1/files/{file['id']}/content", HTTP_ACCEPT="application/binary")  # as the SDK asks
    assert unseen.status_code == 404 and json.loads(unseen.content)["error"]["param"] == "file_id"


def test_uploads_refused_with_the_field_named(owner: TenantFixture, pipeline_config: Any) -> None:
    wrong = upload(owner, line("a", "x"), purpose="fine-tune")
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "purpose"
    empty = upload(owner, "\n  \n")
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "file" and "empty" in empty.json()["error"]["message"]
    missing = owner.client.post("/v1/files", {"purpose": "batch"}, format="multipart")
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
    pipeline_config(with_batch(max_body_mb=1))
    big = upload(owner, b"x" * (1024 * 1024 + 1))
    assert big.status_code == 413 and big.json()["error"]["code"] == "file_too_large" and big.json()["error"]["param"] == "file"
    assert upload(owner, b"y" * (1024 * 1024)).status_code == 200  # the limit itself is allowed
    huge = owner.client.post("/v1/files", b"z" * (1024 * 1024 + 70 * 1024), content_type="multipart/form-data; boundary=b")
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "file_too_large"  # by its length, before it is read
    assert not BatchFile.objects.filter(bytes__gt=1024 * 1024).exists()


def test_a_file_is_deleted_and_its_batch_keeps_running(owner: TenantFixture, finished: list[str]) -> None:
    batch = create(owner, line("a", "one"))
    gone = owner.client.delete(f"/v1/files/{batch['input_file_id']}")
    assert gone.status_code == 200 and gone.json() == {"id": batch["input_file_id"], "object": "file", "deleted": True}
    assert owner.client.get(f"/v1/files/{batch['input_file_id']}").status_code == 404
    run_all(batch)
    deliver(finished)
    after = fetch(owner, batch)
    assert after["status"] == "completed" and after["input_file_id"] == "" and after["request_counts"]["completed"] == 1


# ---- a batch from start to end -----------------------------------------------------


def test_each_line_runs_with_its_own_messages_and_parameters(owner: TenantFixture, fakes: Any, finished: list[str]) -> None:
    system = {"role": "system", "content": "be terse"}
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
    text = "\n".join(
        [
            line("plain", "first question", temperature=0.2, max_tokens=7),
            json.dumps(
                {
                    "custom_id": "with-system",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": MODEL, "messages": [system, {"role": "user", "content": "second"}], "max_completion_tokens": 5, "stop": ["END"]},
                }
            ),
            line("tooled", "find it", tools=tools),
        ]
    )
    batch = create(owner, text, metadata={"team": "search"})
    assert batch["status"] == "in_progress" and batch["endpoint"] == "/v1/chat/completions" and batch["completion_window"] == "24h"
    assert batch["request_counts"] == {"total": 3, "completed": 0, "failed": 0} and batch["metadata"] == {"team": "search"}
    assert batch["expires_at"] - batch["created_at"] == 24 * 3600 and batch["model"] == MODEL
    assert batch["output_file_id"] is None and batch["error_file_id"] is None
    before = len(fakes.openai.requests)
    run_all(batch)
    bodies = [r["body"] for r in fakes.openai.requests[before:]]
    default = {"role": "system", "content": get_config().assemble.system_prompt}  # as /v1/chat/completions adds it
    assert [b["messages"] for b in bodies] == [
        [default, {"role": "user", "content": "first question"}],
        [default, system, {"role": "user", "content": "second"}],
        [default, {"role": "user", "content": "find it"}],
    ]
    assert bodies[0]["temperature"] == 0.2 and bodies[0]["max_completion_tokens"] == 7
    assert bodies[1]["max_completion_tokens"] == 5 and "END" in bodies[1]["stop"] and "temperature" not in bodies[1]
    assert bodies[2]["tools"][0]["function"]["name"] == "lookup" and "tools" not in bodies[0]

    assert fetch(owner, batch)["status"] == "finalizing"  # ended, its files not written yet
    deliver(finished)
    done = fetch(owner, batch)
    assert done["status"] == "completed" and done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert done["completed_at"] >= done["finalizing_at"] >= done["in_progress_at"] >= done["created_at"] and done["error_file_id"] is None
    output = owner.client.get(f"/v1/files/{done['output_file_id']}").json()
    assert output["purpose"] == "batch_output" and output["filename"] == f"{batch['id']}_output.jsonl"
    rows = jsonl(content(owner, done["output_file_id"]))
    assert [r["custom_id"] for r in rows] == ["plain", "with-system", "tooled"]
    assert all(r["id"].startswith("batch_req_") and r["error"] is None and r["response"]["status_code"] == 200 for r in rows)
    first = rows[0]["response"]["body"]
    assert (
        first["object"] == "chat.completion" and first["model"] == MODEL and first["choices"][0]["message"] == {"role": "assistant", "content": "Hello, world!"}
    )
    assert first["choices"][0]["finish_reason"] == "stop" and first["usage"]["total_tokens"] > 0 and isinstance(first["created"], int)
    called = rows[2]["response"]["body"]["choices"][0]
    assert called["finish_reason"] == "tool_calls" and called["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    assert rows[0]["response"]["request_id"] != rows[1]["response"]["request_id"]


def test_bad_lines_are_failed_items_on_their_own_lines_of_the_error_file(owner: TenantFixture, finished: list[str]) -> None:
    text = "\n".join(
        [
            line("good", "fine"),  # 1
            "{not json",  # 2
            line("other-model", "x", model="openai/gpt-other"),  # 3
            line("good", "the same custom_id again"),  # 4
            json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/chat/completions", "body": {"model": MODEL}}),  # 5
            line("elsewhere", "x", url="/v1/embeddings"),  # 6
            "",  # blank lines are not requests
            line("too-hot", "x", temperature=5),  # 8
            json.dumps(
                {
                    "custom_id": "no-user",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": MODEL, "messages": [{"role": "system", "content": "s"}]},
                }
            ),  # 9
            "[1, 2]",  # 10
            json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}}),  # 11
        ]
    )
    batch = create(owner, text)
    assert batch["request_counts"] == {"total": 10, "completed": 0, "failed": 9}
    job = job_of(batch)
    assert list(job.items.filter(status=BatchItem.Status.PENDING).values_list("custom_id", flat=True)) == ["good"]
    run_all(batch)
    deliver(finished)
    done = fetch(owner, batch)
    assert done["status"] == "completed" and done["request_counts"] == {"total": 10, "completed": 1, "failed": 9}
    assert [r["custom_id"] for r in jsonl(content(owner, done["output_file_id"]))] == ["good"]
    errors = jsonl(content(owner, done["error_file_id"]))
    assert [(r["custom_id"], r["response"]["body"]["error"]["line"]) for r in errors] == [
        (None, 2),
        ("other-model", 3),
        ("good", 4),
        ("get", 5),
        ("elsewhere", 6),
        ("too-hot", 8),
        ("no-user", 9),
        (None, 10),
        (None, 11),
    ]
    assert all(r["response"]["status_code"] == 400 and r["error"] is None and r["response"]["body"]["error"]["type"] == "invalid_request_error" for r in errors)
    by_line = {r["response"]["body"]["error"]["line"]: r["response"]["body"]["error"] for r in errors}
    assert "not valid JSON" in by_line[2]["message"] and by_line[3]["param"] == "body.model" and "earlier line" in by_line[4]["message"]
    assert by_line[5]["param"] == "method" and by_line[6]["param"] == "url" and by_line[8]["param"] == "temperature"
    assert by_line[9]["param"] == "messages" and "not a JSON object" in by_line[10]["message"] and by_line[11]["param"] == "custom_id"


def test_a_file_of_only_bad_lines_completes_at_once_with_an_error_file(
    owner: TenantFixture, finished: list[str], django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        batch = create(owner, line("a", "x", temperature=9) + "\n" + line("b", "y", max_tokens=0))
    assert batch["request_counts"] == {"total": 2, "completed": 0, "failed": 2}
    assert finished == [str(job_of(batch).id)]  # nothing to run: straight to its files
    deliver(finished)
    done = fetch(owner, batch)
    assert done["status"] == "completed" and done["output_file_id"] is None
    assert [(r["custom_id"], r["response"]["body"]["error"]["param"]) for r in jsonl(content(owner, done["error_file_id"]))] == [
        ("a", "temperature"),
        ("b", "max_tokens"),
    ]


def test_a_request_the_provider_refuses_is_a_line_with_its_status(owner: TenantFixture, finished: list[str]) -> None:
    orphan = [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "call_9", "content": "a result nobody asked for"}]
    refused = json.dumps({"custom_id": "orphan", "method": "POST", "url": "/v1/chat/completions", "body": {"model": MODEL, "messages": orphan}})
    batch = create(owner, line("fine", "x") + "\n" + refused)
    run_all(batch)
    deliver(finished)
    done = fetch(owner, batch)
    assert done["status"] == "completed" and done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    (error,) = jsonl(content(owner, done["error_file_id"]))
    assert error["custom_id"] == "orphan" and error["response"]["status_code"] == 502 and error["error"] is None
    assert error["response"]["body"]["error"]["type"] == "server_error" and error["response"]["body"]["error"]["code"] == "worker_rejected"
    assert "line" not in error["response"]["body"]["error"]  # it ran: no line is at fault


def test_an_expired_batch_keeps_its_answers_and_lists_the_rest(owner: TenantFixture, finished: list[str]) -> None:
    batch = create(owner, "\n".join(line(f"r{i}", f"q{i}") for i in range(3)))
    job = job_of(batch)
    batch_run_chunk(job_id=str(job.id), first=0, last=0)
    services.expire_if_due(job, now=job.deadline)
    deliver(finished)
    done = fetch(owner, batch)
    assert done["status"] == "expired" and done["expired_at"] is not None and done["completed_at"] is None
    assert done["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
    assert [r["custom_id"] for r in jsonl(content(owner, done["output_file_id"]))] == ["r0"]
    errors = jsonl(content(owner, done["error_file_id"]))
    assert [(r["custom_id"], r["response"], r["error"]["code"]) for r in errors] == [("r1", None, "batch_expired"), ("r2", None, "batch_expired")]


def test_a_cancelled_batch_waits_for_its_running_items_then_lists_the_rest(owner: TenantFixture, finished: list[str]) -> None:
    batch = create(owner, "\n".join(line(f"r{i}", f"q{i}") for i in range(3)))
    job = job_of(batch)
    batch_run_chunk(job_id=str(job.id), first=0, last=0)
    running = job.items.get(index=1)  # a worker holds it as the cancel comes
    running.leased_until = timezone.now() + dt.timedelta(seconds=60)
    running.save(update_fields=["leased_until"])
    cancelled = owner.client.post(f"/v1/batches/{batch['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelling" and cancelled.json()["cancelling_at"] is not None
    assert finished == [str(job.id)]
    deliver(finished)
    assert fetch(owner, batch)["status"] == "cancelling"  # its running item may still be recorded
    assert openai_batches.due() == [str(job.id)]  # the sweep queues it again
    BatchItem.objects.filter(pk=running.pk).update(leased_until=None)
    deliver(finished)
    done = fetch(owner, batch)
    assert done["status"] == "cancelled" and done["cancelled_at"] is not None and openai_batches.due() == []
    assert [r["custom_id"] for r in jsonl(content(owner, done["output_file_id"]))] == ["r0"]
    assert [(r["custom_id"], r["error"]["code"]) for r in jsonl(content(owner, done["error_file_id"]))] == [
        ("r1", "batch_cancelled"),
        ("r2", "batch_cancelled"),
    ]
    again = owner.client.post(f"/v1/batches/{batch['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"  # a second cancel changes nothing


def test_finalizing_twice_writes_the_files_once(owner: TenantFixture, finished: list[str]) -> None:
    batch = create(owner, line("a", "x"))
    job = job_of(batch)
    assert openai_batches.finalize(job) is False  # still running
    run_all(batch)
    job.refresh_from_db()
    assert openai_batches.finalize(job) is True
    first = OpenAIBatch.objects.get(pk=batch["id"]).output_file_id
    assert openai_batches.finalize(job) is True and OpenAIBatch.objects.get(pk=batch["id"]).output_file_id == first
    assert BatchFile.objects.filter(purpose="batch_output").count() == 1


def test_batches_are_listed_newest_first_by_cursor(owner: TenantFixture, outsider: TenantFixture, finished: list[str]) -> None:
    made = [create(owner, line("a", f"x{i}"))["id"] for i in range(3)]
    create(outsider, line("a", "theirs"))
    listed = owner.client.get("/v1/batches").json()
    assert [b["id"] for b in listed["data"]] == made[::-1] and listed["object"] == "list" and not listed["has_more"]
    page = owner.client.get("/v1/batches", {"limit": 2}).json()
    assert [b["id"] for b in page["data"]] == made[:0:-1] and page["has_more"] and page["first_id"] == made[2]
    rest = owner.client.get("/v1/batches", {"limit": 2, "after": page["last_id"]}).json()
    assert [b["id"] for b in rest["data"]] == [made[0]] and not rest["has_more"]
    for bad in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"after": "batch_nope"}):
        resp = owner.client.get("/v1/batches", bad)
        assert resp.status_code == 400 and resp.json()["error"]["param"] in ("limit", "after")
    assert outsider.client.get(f"/v1/batches/{made[0]}").status_code == 404
    assert outsider.client.post(f"/v1/batches/{made[0]}/cancel").status_code == 404


# ---- refusals of the whole request -------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"endpoint": "/v1/embeddings"}, "endpoint", "only one"),
        ({"completion_window": "1h"}, "completion_window", "24h"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16"),
        ({"metadata": {"k": 1}}, "metadata", "strings"),
        ({"input_file_id": "file-nothing"}, "file_id", "no file"),
        ({"input_file_id": None}, "input_file_id", "null"),
    ],
)
def test_a_batch_refused_whole_names_its_field(owner: TenantFixture, fields: dict[str, Any], param: str, words: str) -> None:
    file_id = upload(owner, line("a", "x")).json()["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **fields}
    resp = owner.client.post("/v1/batches", body, format="json")
    assert resp.status_code in (400, 404), resp.content
    error = resp.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert not OpenAIBatch.objects.exists() and not BatchJob.objects.exists()


@pytest.mark.parametrize(
    ("text", "param", "words"),
    [
        (b"\xff\xfe not utf-8\n", "input_file_id", "not UTF-8"),
        (line("a", "x", model="nobody/none").encode(), "model", "no model named"),
        (b"{}\n[]\n", "input_file_id", "names a model"),
    ],
)
def test_a_file_that_cannot_be_a_batch_is_refused(owner: TenantFixture, text: bytes, param: str, words: str) -> None:
    file_id = upload(owner, text).json()["id"]
    resp = owner.client.post("/v1/batches", {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}, format="json")
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param and words in resp.json()["error"]["message"], resp.content


def test_a_file_over_the_item_limit_is_refused(owner: TenantFixture) -> None:
    original = get_config()
    set_config(with_batch(max_items=2))
    try:
        file_id = upload(owner, "\n".join(line(f"r{i}", "x") for i in range(3))).json()["id"]
        resp = owner.client.post("/v1/batches", {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}, format="json")
    finally:
        set_config(original)
    assert resp.status_code == 400 and "at most 2" in resp.json()["error"]["message"]


def test_an_output_file_is_not_an_input_file(owner: TenantFixture, finished: list[str]) -> None:
    batch = create(owner, line("a", "x"))
    run_all(batch)
    deliver(finished)
    output = fetch(owner, batch)["output_file_id"]
    resp = owner.client.post("/v1/batches", {"input_file_id": output, "endpoint": "/v1/chat/completions", "completion_window": "24h"}, format="json")
    assert resp.status_code == 400 and "not a batch input file" in resp.json()["error"]["message"]
    job_of(batch).delete()  # the job, its batch and its items gone: the output file has nothing to read
    assert owner.client.get(f"/v1/files/{output}").status_code == 404 and owner.client.get(f"/v1/files/{output}/content").status_code == 404
    assert output not in [f["id"] for f in owner.client.get("/v1/files").json()["data"]]


def test_a_chunk_stopped_by_the_cancel_queues_the_files_itself(owner: TenantFixture, finished: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    batch = create(owner, "\n".join(line(f"r{i}", f"q{i}") for i in range(4)))
    job = job_of(batch)
    run_item = services._run_item

    def cancelled_meanwhile(*args: Any) -> Any:
        ran = run_item(*args)
        services.batch_cancel(tenant_id=str(owner.tenant.id), job_id=job.id)  # as the client cancels during the item
        return ran

    monkeypatch.setattr(services, "_run_item", cancelled_meanwhile)
    batch_run_chunk(job_id=str(job.id), first=0, last=3)
    assert finished == [str(job.id), str(job.id)]  # by the cancel, then by the chunk once its item was recorded
    deliver(finished)
    done = fetch(owner, batch)
    assert done["status"] == "cancelled" and done["request_counts"] == {"total": 4, "completed": 1, "failed": 0}
    assert len(jsonl(content(owner, done["error_file_id"]))) == 3
