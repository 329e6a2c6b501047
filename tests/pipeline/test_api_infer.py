"""POST /api/v1/infer end to end: the gateway enqueues on `realtime`, a real Celery
worker process runs the five stages, the result comes back over the token bus."""

from __future__ import annotations

import time

import pytest

from pipeline.config import get_config, set_config
from pipeline.tokenbus import get_bus
from tests.conftest import Fakes, TenantFixture, WorkerProcess
from tests.pipeline.test_types_and_models import RESULT_FIELDS

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

INFER = "/api/v1/infer"
STAGES = ["rag", "assemble", "inference", "post", "stream"]


@pytest.fixture(autouse=True)
def _worker(realtime_worker: WorkerProcess, fakes: Fakes) -> None:
    """Every test here runs against the real worker process and the fakes."""


def infer(tenant: TenantFixture, **body: object) -> tuple[int, dict]:
    resp = tenant.client.post(INFER, body, format="json")
    return resp.status_code, resp.json()


def test_echo_completion_with_all_five_timings(owner: TenantFixture, realtime_worker: WorkerProcess) -> None:
    status, body = infer(owner, prompt="hello there world")
    assert status == 200, body
    assert list(body) == RESULT_FIELDS
    assert body["status"] == "completed" and body["worker"] == "echo" and body["model"] == "echo-1"
    assert body["text"] == "hello there world hello there world hello there"
    assert list(body["timings_us"]) == STAGES and all(isinstance(v, int) and v >= 0 for v in body["timings_us"].values())
    assert body["usage"]["completion_tokens"] == 8 and body["session_id"] == body["request_id"]
    # Run by the worker process, not in this one (no eager mode).
    executed_by = get_bus().get_record(body["request_id"])["executed_by"]
    assert executed_by.endswith(f":{realtime_worker.pid}")


@pytest.mark.parametrize(("worker", "model"), [("openai", "gpt-fake"), ("anthropic", "claude-fake"), ("llamacpp", "llamacpp"), ("vllm", "vllm")])
def test_each_http_worker_through_the_pipeline(owner: TenantFixture, worker: str, model: str) -> None:
    status, body = infer(owner, prompt="say hello", worker=worker)
    assert status == 200, body
    assert body["text"] == "Hello, world!" and body["worker"] == worker
    assert body["usage"]["completion_tokens"] == 4


def test_async_form_then_status_and_result(owner: TenantFixture) -> None:
    status, queued = infer(owner, prompt="later please", wait=False)
    assert status == 202 and set(queued) == {"request_id", "status"} and queued["status"] == "queued"
    request_id = queued["request_id"]
    deadline = time.monotonic() + 10
    while owner.client.get(f"/api/v1/status/{request_id}").json()["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    state = owner.client.get(f"/api/v1/status/{request_id}").json()
    assert set(state) == {"request_id", "session_id", "status", "created_at", "updated_at"} and state["updated_at"] >= state["created_at"]
    result = owner.client.get(f"/api/v1/result/{request_id}")
    assert result.status_code == 200 and result.json()["text"].startswith("later please") and list(result.json()["timings_us"]) == STAGES


def test_result_before_completion_is_202(owner: TenantFixture, fakes: Fakes) -> None:
    fakes.openai.mode, fakes.openai.hang_s = "hang", 1.0
    _, queued = infer(owner, prompt="slow", worker="openai", wait=False)
    resp = owner.client.get(f"/api/v1/result/{queued['request_id']}")
    assert resp.status_code == 202 and resp.json()["status"] in ("queued", "running")


def test_outsider_gets_404_on_status_and_result(owner: TenantFixture, outsider: TenantFixture) -> None:
    _, body = infer(owner, prompt="mine")
    for path in (f"/api/v1/status/{body['request_id']}", f"/api/v1/result/{body['request_id']}"):
        resp = outsider.client.get(path)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
        assert owner.client.get(path).status_code == 200


def test_session_turns_are_replayed(owner: TenantFixture, fakes: Fakes) -> None:
    infer(owner, prompt="my name is Ada", worker="openai", session_id="sess-1")
    infer(owner, prompt="what is my name?", worker="openai", session_id="sess-1")
    messages = fakes.openai.requests[-1]["body"]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == "my name is Ada" and messages[2]["content"] == "Hello, world!"
    infer(owner, prompt="fresh", worker="openai", session_id="sess-2")
    assert [m["role"] for m in fakes.openai.requests[-1]["body"]["messages"]] == ["system", "user"]


def test_rag_puts_the_tenants_documents_into_the_prompt(owner: TenantFixture, outsider: TenantFixture, fakes: Fakes) -> None:
    owner.client.post("/api/v1/documents", {"title": "Refund policy", "body": "Refunds are accepted within 30 days."}, format="json")
    outsider.client.post("/api/v1/documents", {"title": "Outsider refund memo", "body": "Secret refund rules."}, format="json")
    status, _ = infer(owner, prompt="What is the refund policy?", worker="openai")
    assert status == 200
    system = fakes.openai.requests[-1]["body"]["messages"][0]["content"]
    assert "Refunds are accepted within 30 days." in system
    assert "Secret" not in system and "Outsider" not in system


def test_parameters_reach_the_provider(owner: TenantFixture, fakes: Fakes) -> None:
    infer(owner, prompt="hi", worker="openai", model="gpt-other", max_tokens=3, temperature=0.7, stop=["END"])
    sent = fakes.openai.requests[-1]["body"]
    assert (sent["model"], sent["max_completion_tokens"], sent["temperature"], sent["stop"]) == ("gpt-other", 3, 0.7, ["END"])


def test_stop_sequence_and_redaction_apply(owner: TenantFixture, fakes: Fakes) -> None:
    fakes.openai.tokens = ["write to ", "ops@corp.example", " now STOP ignored"]
    status, body = infer(owner, prompt="contact?", worker="openai", stop=["STOP"])
    assert status == 200 and body["text"] == "write to [REDACTED] now" and body["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("worker", "mode", "status", "code"),
    [
        ("openai", "429", 429, "worker_rate_limited"),
        ("anthropic", "529", 503, "worker_unavailable"),
        ("llamacpp", "503", 503, "worker_unavailable"),
        ("vllm", "500", 503, "worker_unavailable"),
        ("openai", "malformed", 502, "worker_protocol_error"),
        ("anthropic", "401", 502, "worker_auth_error"),
        ("openai", "400", 502, "worker_rejected"),
    ],
)
def test_worker_failures_map_to_their_errors(owner: TenantFixture, fakes: Fakes, worker: str, mode: str, status: int, code: str) -> None:
    fake = getattr(fakes, worker)
    fake.mode, fake.retry_after = mode, "9"
    resp = owner.client.post(INFER, {"prompt": "hi", "worker": worker}, format="json")
    error = resp.json()["error"]
    assert resp.status_code == status and error["code"] == code
    assert error["data"]["worker"] == worker
    if mode in ("429", "529", "503"):
        assert resp["Retry-After"] == "9" and error["data"]["retry_after"] == 9.0


def test_worker_timeout_is_504(owner: TenantFixture, fakes: Fakes) -> None:
    fakes.openai.mode, fakes.openai.hang_s = "hang", 3.0  # the worker's timeout is 2 s
    resp = owner.client.post(INFER, {"prompt": "hi", "worker": "openai"}, format="json")
    assert resp.status_code == 504 and resp.json()["error"]["code"] == "worker_timeout"


def test_failed_request_result_is_its_error(owner: TenantFixture, fakes: Fakes) -> None:
    fakes.vllm.mode = "401"
    _, queued = infer(owner, prompt="hi", worker="vllm", wait=False)
    deadline = time.monotonic() + 10
    while owner.client.get(f"/api/v1/status/{queued['request_id']}").json()["status"] != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    resp = owner.client.get(f"/api/v1/result/{queued['request_id']}")
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "worker_auth_error"


def test_the_deadline_reaches_the_client_as_the_workers_timeout(owner: TenantFixture, fakes: Fakes) -> None:
    # The provider hangs for 1.5 s and the worker's own timeout is 2 s: only the request's
    # deadline (0.3 s from acceptance, enforced in the worker) can end it sooner.
    fakes.openai.mode, fakes.openai.hang_s = "hang", 1.5
    config = get_config()
    set_config(config.model_copy(update={"limits": config.limits.model_copy(update={"request_timeout_s": 0.3})}))
    try:
        started = time.monotonic()
        resp = owner.client.post(INFER, {"prompt": "hi", "worker": "openai"}, format="json")
    finally:
        set_config(config)
    error = resp.json()["error"]
    assert resp.status_code == 504 and error["code"] == "worker_timeout", error
    assert time.monotonic() - started < 1.4
