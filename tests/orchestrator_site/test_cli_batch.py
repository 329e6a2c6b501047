"""``orchestrator batch``, run as installed, against a real gateway process and a real
batch worker: submit a file (prompt lines and OpenAI batch lines), follow it to its
end with a progress bar, read its status and results; and every bad input refused
with a clear message and nothing submitted."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from batches.models import BatchJob
from tests.batches.test_batch_worker import start_batch_worker
from tests.conftest import Fakes, TenantFixture, free_port, start_gateway, stop_process
from tests.orchestrator_site.test_cli import SCRIPT

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def gateway(django_db_setup: None, session_fakes: Fakes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("cli-batch")
    worker = start_batch_worker(tmp, "cli-batch", concurrency=2)
    proc, url = start_gateway(tmp / "gateway.log")
    yield url
    stop_process(proc)
    stop_process(worker.proc)


def run(gateway: str, key: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "ORCHESTRATOR_URL": gateway, "ORCHESTRATOR_API_KEY": key, **env}
    return subprocess.run([str(SCRIPT), "batch", *args], capture_output=True, text=True, timeout=120, env=full, check=False)


def jsonl(path: Path, *lines: object) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


OPENAI_LINE = {
    "custom_id": "req-2",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"model": "echo-1", "messages": [{"role": "user", "content": "two"}]},
}


def test_submit_wait_status_and_results(gateway: str, owner: TenantFixture, tmp_path: Path) -> None:
    file = jsonl(tmp_path / "in.jsonl", {"prompt": "one", "custom_id": "req-1"}, {"prompt": "two", "custom_id": "req-2"}, "", {"prompt": "three"})
    done = run(gateway, owner.key, "submit", str(file), "--priority", "high", "--wait")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["status"] == "completed" and job["priority"] == "high" and job["model"] == "echo-1"
    assert job["counts"] == {"total": 3, "done": 3, "failed": 0, "expired": 0, "pending": 0, "cancelled": 0}
    # The progress bar (drawn on a terminal; its label otherwise) and the summary, on stderr.
    assert done.stderr.splitlines() == [f"job {job['id']}", f"job {job['id']}: completed, 3 done, 0 failed, 0 expired"]

    status = run(gateway, owner.key, "status", job["id"])
    assert status.returncode == 0 and json.loads(status.stdout)["id"] == job["id"]
    results = run(gateway, owner.key, "results", job["id"])
    rows = [json.loads(line) for line in results.stdout.splitlines()]
    assert [(r["index"], r["custom_id"], r["status"]) for r in rows] == [(0, "req-1", "done"), (1, "req-2", "done"), (2, "", "done")]
    assert rows[1]["text"].startswith("two")

    # Followed from its submission: each item as it finishes, and the command ends with the job.
    running = json.loads(run(gateway, owner.key, "submit", str(jsonl(tmp_path / "more.jsonl", *[{"prompt": f"p{i}"} for i in range(30)]))).stdout)
    followed = run(gateway, owner.key, "results", running["id"], "--follow")
    assert followed.returncode == 0, followed.stderr
    assert sorted(json.loads(line)["index"] for line in followed.stdout.splitlines()) == list(range(30))
    assert json.loads(run(gateway, owner.key, "status", running["id"]).stdout)["status"] == "completed"


def test_openai_request_lines_run_with_their_own_bodies(gateway: str, owner: TenantFixture, tmp_path: Path) -> None:
    conversation = [
        {"role": "system", "content": "terse"},
        {"role": "user", "content": "earlier"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "now"},
    ]
    second = {**OPENAI_LINE, "custom_id": "req-3", "body": {**OPENAI_LINE["body"], "messages": conversation, "max_tokens": 3}}
    done = run(gateway, owner.key, "submit", str(jsonl(tmp_path / "in.jsonl", OPENAI_LINE, second)), "--wait")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert (job["worker"], job["model"], job["counts"]["done"]) == ("echo", "echo-1", 2)
    item = BatchJob.objects.get(pk=job["id"]).items.get(custom_id="req-3")
    assert item.request == second["body"] and item.usage["completion_tokens"] == 3  # its own body: its messages and max_tokens
    rows = [json.loads(line) for line in run(gateway, owner.key, "results", job["id"]).stdout.splitlines()]
    assert [(r["custom_id"], r["text"].split()[0]) for r in rows] == [("req-2", "two"), ("req-3", "now")]
    flags = run(gateway, owner.key, "submit", str(jsonl(tmp_path / "again.jsonl", OPENAI_LINE)), "--model", "echo-1")
    assert flags.returncode == 2 and "drop --worker, --model and --max-tokens" in flags.stderr


def test_submit_without_wait_prints_the_job_at_once_with_its_destination(gateway: str, owner: TenantFixture, tmp_path: Path) -> None:
    file = jsonl(tmp_path / "in.jsonl", {"prompt": "later"})
    done = run(gateway, owner.key, "submit", str(file), "--to", "file://cli/out.jsonl", "--deadline", "2099-01-01T00:00:00Z")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["destinations"][0]["path"] == "cli/out.jsonl" and job["deadline"].startswith("2099-01-01")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["{not json"], "line 1: not JSON"),
        (["[1, 2]"], "line 1: must be a JSON object"),
        ([{"prompt": "ok"}, {"custom_id": "x"}], 'line 2: needs "prompt"'),
        ([{"prompt": "ok"}, OPENAI_LINE], "one kind of line per file"),
        ([""], "the file has no prompts"),
    ],
)
def test_a_bad_file_is_refused_naming_the_line_and_nothing_is_submitted(
    gateway: str, owner: TenantFixture, tmp_path: Path, lines: list[object], message: str
) -> None:
    refused = run(gateway, owner.key, "submit", str(jsonl(tmp_path / "bad.jsonl", *lines)))
    assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    assert not BatchJob.objects.filter(tenant=owner.tenant).exists()


def test_what_the_gateway_refuses_is_said_in_one_line(gateway: str, owner: TenantFixture, tmp_path: Path) -> None:
    file = jsonl(tmp_path / "in.jsonl", {"prompt": "p"})
    past = run(gateway, owner.key, "submit", str(file), "--deadline", "2001-01-01T00:00:00Z")
    assert past.returncode == 1 and "the gateway answered 400: invalid_request" in past.stderr
    wrong_key = run(gateway, "po_nope_nope", "status", "6f1c2a4e-0000-4000-8000-000000000000")
    assert wrong_key.returncode == 1 and "401: api_key_invalid" in wrong_key.stderr
    other = {**OPENAI_LINE, "custom_id": "req-9", "body": {**OPENAI_LINE["body"], "model": "other"}}
    two_models = run(gateway, owner.key, "submit", str(jsonl(tmp_path / "two.jsonl", OPENAI_LINE, other)))
    assert two_models.returncode == 1 and "400: invalid_request" in two_models.stderr and "item 1: the model must be" in two_models.stderr
    missing = run(gateway, owner.key, "results", "6f1c2a4e-0000-4000-8000-000000000000")
    assert missing.returncode == 1 and "404" in missing.stderr


def test_without_a_key_a_gateway_or_a_supported_destination_it_says_so(gateway: str, owner: TenantFixture, tmp_path: Path) -> None:
    file = jsonl(tmp_path / "in.jsonl", {"prompt": "p"})
    no_key = run(gateway, "", "status", "x")
    assert no_key.returncode == 2 and "ORCHESTRATOR_API_KEY is not set" in no_key.stderr
    nowhere = run(f"http://127.0.0.1:{free_port()}", owner.key, "status", "x")
    assert nowhere.returncode == 1 and "cannot reach the gateway" in nowhere.stderr
    s3 = run(gateway, owner.key, "submit", str(file), "--to", "s3://Not_A_Bucket/prefix")
    assert s3.returncode == 1 and "destinations[0]: bucket must be an S3 bucket name" in s3.stderr
    private = run(gateway, owner.key, "submit", str(file), "--to", "http://10.0.0.5/hook")
    assert private.returncode == 1 and "10.0.0.5, which is not public" in private.stderr
    assert not BatchJob.objects.filter(tenant=owner.tenant).exists()


def test_a_job_with_failed_items_ends_the_wait_with_status_one(gateway: str, owner: TenantFixture, tmp_path: Path) -> None:
    too_long = "x" * 2001  # over the suite's limits.max_prompt_chars: the item fails alone
    done = run(gateway, owner.key, "submit", str(jsonl(tmp_path / "in.jsonl", {"prompt": too_long}, {"prompt": "fine"})), "--wait")
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["counts"]["failed"] == 1


def test_the_unreachable_results_stream_is_said_in_one_line(owner: TenantFixture) -> None:
    nowhere = subprocess.run(
        [str(SCRIPT), "batch", "results", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "ORCHESTRATOR_URL": f"http://127.0.0.1:{free_port()}", "ORCHESTRATOR_API_KEY": owner.key},
        check=False,
    )
    assert nowhere.returncode == 1 and "cannot reach the gateway" in nowhere.stderr


def test_a_worker_process_is_not_needed_to_read_the_help() -> None:
    shown = subprocess.run([str(SCRIPT), "batch", "submit", "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0 and "--priority" in shown.stdout and "--wait" in shown.stdout


def test_the_options_reach_the_job(gateway: str, owner: TenantFixture, tmp_path: Path) -> None:
    file = jsonl(tmp_path / "in.jsonl", {"prompt": "options"})
    done = run(gateway, owner.key, "submit", str(file), "--worker", "echo_priced", "--max-tokens", "5", "--priority", "low")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert (job["worker"], job["model"], job["priority"]) == ("echo_priced", "echo-priced-1", "low")
    assert BatchJob.objects.get(pk=job["id"]).max_tokens == 5


def test_a_file_that_is_not_text_is_refused(gateway: str, owner: TenantFixture, tmp_path: Path) -> None:
    binary = tmp_path / "in.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    refused = run(gateway, owner.key, "submit", str(binary))
    assert refused.returncode == 2 and str(binary) in refused.stderr
    absent = run(gateway, owner.key, "submit", str(tmp_path / "absent.jsonl"))
    assert absent.returncode == 2 and "does not exist" in absent.stderr
    assert not BatchJob.objects.filter(tenant=owner.tenant).exists()


def test_results_redirected_to_a_file_are_the_apis_lines(gateway: str, owner: TenantFixture, tmp_path: Path) -> None:
    done = run(gateway, owner.key, "submit", str(jsonl(tmp_path / "in.jsonl", *({"prompt": f"p{i}"} for i in range(5)))), "--wait")
    job_id = json.loads(done.stdout)["id"]
    out = tmp_path / "out.jsonl"
    with out.open("w") as handle:
        full = {**os.environ, "ORCHESTRATOR_URL": gateway, "ORCHESTRATOR_API_KEY": owner.key}
        subprocess.run([str(SCRIPT), "batch", "results", job_id], stdout=handle, text=True, timeout=60, env=full, check=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(5)) and all(r["status"] == "done" for r in rows)


def test_a_wait_that_ends_in_expired_items_exits_with_one(gateway: str, owner: TenantFixture, tmp_path: Path) -> None:
    # Far enough ahead that the command starts and the gateway accepts it on a slow
    # machine; near enough that two threads cannot run 5,000 items by then.
    soon = (dt.datetime.now(tz=dt.UTC) + dt.timedelta(seconds=6)).isoformat()
    file = jsonl(tmp_path / "in.jsonl", *({"prompt": f"p{i}"} for i in range(5_000)))
    done = run(gateway, owner.key, "submit", str(file), "--deadline", soon, "--wait")
    assert done.returncode == 1, done.stderr
    counts = json.loads(done.stdout)["counts"]
    assert counts["expired"] > 0 and counts["done"] + counts["expired"] == 5_000
    assert f"{counts['expired']} expired" in done.stderr.splitlines()[-1]
