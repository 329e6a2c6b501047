"""The task boundary and the services around it, run in-process against real Postgres and Redis."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator_site.errors import InvalidRequest, NotFound, OrchestratorError, UnknownModel, UnknownWorker
from pipeline import selectors
from pipeline.config import PipelineSettings, WorkerConfig
from pipeline.routing import WorkerPool, route_request, worker_pool
from pipeline.services import execute, sessions, start
from pipeline.tokenbus import get_bus
from pipeline.types import AssembledPrompt, Completion, PromptRequest
from tests.conftest import TenantFixture, free_port, queue_request, run_in_process

ROOT = Path(__file__).resolve().parents[2]


def build(tenant: TenantFixture, **data: object) -> PromptRequest:
    return start.infer_build_request(tenant_id=str(tenant.tenant.id), data={"prompt": "hello world", **data}, config=PipelineSettings())


def last_event(request_id: str) -> tuple[str, dict]:
    event = get_bus().read_all(request_id)[-1]
    return event.type, event.data


@pytest.mark.django_db
def test_build_request_routes_and_fills_defaults(owner: TenantFixture) -> None:
    request = build(owner)
    assert (request.worker, request.model, request.max_tokens) == ("echo", "echo-1", 256)
    assert request.session_id == request.request_id and len(request.request_id) == 32
    explicit = build(owner, session_id="s", max_tokens=9, temperature=0.1, stop=["x"], metadata={"k": 1})
    assert (explicit.session_id, explicit.max_tokens, explicit.temperature, explicit.stop, dict(explicit.metadata)) == ("s", 9, 0.1, ("x",), {"k": 1})


@pytest.mark.django_db
def test_build_request_rejects_unknown_worker_model_and_big_max_tokens(owner: TenantFixture) -> None:
    with pytest.raises(UnknownWorker):
        build(owner, worker="nope")
    with pytest.raises(UnknownModel):
        build(owner, model="gpt-4")
    with pytest.raises(InvalidRequest):
        build(owner, max_tokens=10_000)


def test_route_request_accepts_any_model_when_none_are_listed() -> None:
    config = PipelineSettings(workers={"echo": WorkerConfig(kind="echo")})
    assert route_request(config, worker=None, model="anything").model == "anything"
    assert route_request(config, worker=None, model=None).model == "echo"


def test_worker_pool_builds_once_per_worker_settings() -> None:
    pool = WorkerPool()
    config = PipelineSettings()
    first = pool.get(config, "echo")
    assert pool.get(config, "echo") is first
    assert pool.get(PipelineSettings(), "echo") is first  # a reloaded config, the same worker: kept
    changed = PipelineSettings(workers={"echo": WorkerConfig(kind="echo", token_count=3)})
    assert pool.get(changed, "echo") is not first and pool.get(changed, "echo").settings.token_count == 3  # type: ignore[attr-defined]
    assert pool.get(config, "echo") is first  # the older version's, still there for its requests
    with pytest.raises(UnknownWorker):
        pool.get(config, "missing")


def test_worker_pool_forgets_old_workers_beyond_its_bound() -> None:
    pool = WorkerPool()
    built = [pool.get(PipelineSettings(workers={"echo": WorkerConfig(kind="echo", token_count=n)}), "echo") for n in range(WorkerPool.MAX_BUILT + 1)]
    assert len(pool._workers) == 1 and pool.get(PipelineSettings(workers={"echo": WorkerConfig(kind="echo", token_count=0)}), "echo") is not built[0]


@pytest.mark.django_db(transaction=True)
def test_execute_publishes_done_and_stores_turns(owner: TenantFixture) -> None:
    request = build(owner, session_id="svc")
    run_in_process(request)
    kind, data = last_event(request.request_id)
    assert kind == "done" and data["text"].startswith("hello world")
    assert get_bus().get_record(request.request_id)["status"] == "completed"
    assert owner.tenant.turns.filter(session_id="svc").count() == 2


@pytest.mark.parametrize(("request_id", "attempt"), [(None, 1), ({"request_id": "x"}, 1), ("x", "1"), ("x", 0), ("x", True), ("x", 1.5)])
def test_a_message_that_is_not_ours_is_dropped_without_crashing(request_id: object, attempt: object) -> None:
    execute.realtime_execute(request_id, attempt)


@pytest.mark.django_db(transaction=True)
def test_a_record_this_version_cannot_read_is_answered_with_an_error(owner: TenantFixture) -> None:
    request = build(owner)
    queue_request(request)
    get_bus().set_record(request.request_id, payload=json.dumps({"request_id": request.request_id, "max_tokens": "lots"}))
    execute.realtime_execute(request.request_id, 1)
    kind, data = last_event(request.request_id)
    assert kind == "error" and data["code"] == "internal_error" and "unreadable" in data["message"]


@pytest.mark.django_db(transaction=True)
def test_stale_redelivery_is_dropped(owner: TenantFixture) -> None:
    request = build(owner)
    queue_request(request)
    get_bus().set_record(request.request_id, status="completed")
    execute.realtime_execute(request.request_id, 1)
    assert get_bus().read_all(request.request_id) == []


@pytest.mark.django_db(transaction=True)
def test_a_request_whose_record_is_gone_is_dropped(owner: TenantFixture) -> None:
    execute.realtime_execute("never-recorded", 1)
    assert get_bus().read_all("never-recorded") == []


@pytest.mark.django_db(transaction=True)
def test_a_task_for_a_worker_this_process_does_not_know_is_answered_with_an_error(owner: TenantFixture) -> None:
    """The gateway routed it on a config this worker does not have (a rollout): no
    breaker to ask at the start, and the pipeline's error is the answer, not a timeout."""
    request = dataclasses.replace(build(owner), worker="retired")
    run_in_process(request)
    kind, data = last_event(request.request_id)
    assert kind == "error" and data["code"] == "unknown_worker"
    assert get_bus().get_record(request.request_id)["status"] == "failed"


class Exploding:
    name = "boom"
    supports_streaming = False

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def infer(self, prompt: AssembledPrompt) -> Completion:
        raise self.exc


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("exc", "code"), [(RuntimeError("bug"), "internal_error"), (OrchestratorError("x"), "internal_error")])
def test_failures_become_error_events(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch, exc: BaseException, code: str) -> None:
    monkeypatch.setattr(worker_pool, "get", lambda config, name: Exploding(exc))
    request = build(owner)
    run_in_process(request)
    kind, data = last_event(request.request_id)
    assert kind == "error" and data["code"] == code
    assert get_bus().get_record(request.request_id)["status"] == "failed"
    assert "bug" not in json.dumps(data)  # internals are logged, not sent to the client


@pytest.mark.django_db
def test_result_of_an_expired_stream_is_not_found(owner: TenantFixture) -> None:
    get_bus().set_record("gone", status="completed", tenant_id=str(owner.tenant.id))
    with pytest.raises(NotFound):
        selectors.request_result_for_tenant(tenant_id=str(owner.tenant.id), request_id="gone")


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_with_the_broker_down_the_gateway_answers_the_request_itself(owner: TenantFixture) -> None:
    from django.conf import settings

    db = settings.DATABASES["default"]
    code = (
        "import django, json; django.setup(); from rest_framework.test import APIClient; c = APIClient(); "
        f"c.credentials(HTTP_AUTHORIZATION='Bearer {owner.key}'); "
        "r = c.post('/api/v1/infer', {'prompt': 'hi'}, format='json'); print(r.status_code, json.dumps(r.json()))"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "orchestrator_site.settings",
        "DATABASE_URL": f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    status, body = proc.stdout.split(" ", 1)
    result = json.loads(body)
    assert status == "200" and result["text"].startswith("hi") and list(result["timings_us"]) == ["rag", "assemble", "inference", "post", "stream"]
    # Redis is up: the request's status says it completed, and who ran it (that process).
    recorded = get_bus().get_record(result["request_id"])
    assert recorded["status"] == "completed" and recorded["executed_by"] and not recorded["executed_by"].endswith(f":{os.getpid()}")


@pytest.mark.django_db
def test_a_request_without_a_session_reads_no_history(owner: TenantFixture) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    fresh = build(owner)
    assert fresh.session_id == fresh.request_id
    with CaptureQueriesContext(connection) as queries:
        assert sessions.session_history_for(fresh, turns=4) == ()
    assert queries.captured_queries == []  # a session nobody could have named yet


@pytest.mark.django_db
def test_a_session_continued_by_its_returned_id_replays_its_turns(owner: TenantFixture) -> None:
    first = build(owner, prompt="my name is Ada")
    run_in_process(first)
    _kind, data = last_event(first.request_id)
    second = build(owner, prompt="what is my name?", session_id=data["session_id"])
    history = sessions.session_history_for(second, turns=4)
    assert len(history) == 2 and (history[0].role, history[0].content) == ("user", "my name is Ada")
