"""OpenAI's Batch API driven by the official ``openai`` SDK against a real gateway
(uvicorn, as ``make run`` starts it) and a real batch worker: upload, create, poll,
download the output and error files, list, and cancel."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.batches.test_batch_worker import batch_worker  # noqa: F401 - the module's batch worker
from tests.conftest import TenantFixture, start_gateway, stop_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300), pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("batch_worker")]

ENDED = ("completed", "expired", "cancelled", "failed")


@pytest.fixture(scope="module")
def gateway(batch_worker: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # noqa: F811 - the fixture above
    proc, url = start_gateway(tmp_path_factory.mktemp("openai-batch") / "gateway.log")
    yield url
    stop_process(proc)


def sdk(gateway: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0, timeout=60)


def requests_file(count: int, *, model: str = "echo/echo-1", bad: dict[int, str] | None = None) -> bytes:
    lines = []
    for i in range(count):
        body = {"model": model, "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": f"question {i}"}], "max_tokens": 8}
        lines.append((bad or {}).get(i) or json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
    return ("\n".join(lines) + "\n").encode()


def wait(client: openai.OpenAI, batch_id: str, timeout_s: float = 120) -> openai.types.Batch:
    deadline = time.monotonic() + timeout_s
    while (batch := client.batches.retrieve(batch_id)).status not in ENDED:
        assert time.monotonic() < deadline, batch
        time.sleep(0.3)
    return batch


def test_the_sdk_uploads_creates_polls_and_downloads(gateway: str, owner: TenantFixture, tmp_path: Path) -> None:
    client = sdk(gateway, owner.key)
    path = tmp_path / "requests.jsonl"
    path.write_bytes(requests_file(40, bad={7: "{oops", 9: json.dumps({"custom_id": "req-9", "method": "POST", "url": "/v1/embeddings", "body": {}})}))
    with path.open("rb") as handle:
        uploaded = client.files.create(file=handle, purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == path.stat().st_size and uploaded.filename == "requests.jsonl"
    assert client.files.retrieve(uploaded.id).id == uploaded.id and client.files.content(uploaded.id).content == path.read_bytes()

    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "nightly"})
    assert created.status == "in_progress" and created.input_file_id == uploaded.id and created.metadata == {"run": "nightly"}
    done = wait(client, created.id)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (40, 38, 2)
    assert done.completed_at is not None and done.output_file_id and done.error_file_id

    output = [json.loads(row) for row in client.files.content(done.output_file_id).text.splitlines()]
    assert [row["custom_id"] for row in output] == [f"req-{i}" for i in range(40) if i not in (7, 9)]
    for row in output:
        answer = row["response"]["body"]["choices"][0]["message"]["content"]
        assert row["response"]["status_code"] == 200 and answer.startswith(f"question {row['custom_id'][4:]}"), row
    errors = [json.loads(row) for row in client.files.content(done.error_file_id).text.splitlines()]
    assert [(row["custom_id"], row["response"]["body"]["error"]["line"]) for row in errors] == [(None, 8), ("req-9", 10)]
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
    assert created.id in [b.id for b in client.batches.list(limit=1)]  # the SDK follows the cursor, a page at a time
    assert {uploaded.id, done.output_file_id, done.error_file_id} <= {f.id for f in client.files.list()}
    assert client.files.delete(uploaded.id).deleted and client.batches.retrieve(created.id).input_file_id == ""

    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_unknown")
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    assert refused.value.param == "endpoint"  # type: ignore[attr-defined]


def test_the_sdk_cancels_a_running_batch(gateway: str, owner: TenantFixture) -> None:
    client = sdk(gateway, owner.key)
    uploaded = client.files.create(file=("many.jsonl", requests_file(3000)), purpose="batch")
    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    time.sleep(0.5)  # some items run
    cancelling = client.batches.cancel(created.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    done = wait(client, created.id, timeout_s=60)  # no sweep runs here: the chunks that were running finalize it
    assert done.status == "cancelled" and done.cancelled_at is not None and done.request_counts is not None
    ran = done.request_counts.completed
    assert 0 < ran < 3000 and done.request_counts.failed == 0
    output = client.files.content(done.output_file_id).text.splitlines() if done.output_file_id else []
    errors = [json.loads(row) for row in client.files.content(done.error_file_id).text.splitlines()]
    assert len(output) == ran and len(errors) == 3000 - ran and {row["error"]["code"] for row in errors} == {"batch_cancelled"}
