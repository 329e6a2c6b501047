"""How the gateway turns a request's token stream into a result or an error."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from orchestrator_site.errors import RequestTimeout, WorkerTimeout
from pipeline import services
from pipeline.tokenbus import get_bus
from pipeline.types import PipelineResult, PromptRequest, Usage

REQUEST = PromptRequest(request_id="", tenant_id="t", session_id="s", prompt="p", worker="echo", model="echo-1", max_tokens=5)


def request(name: str) -> PromptRequest:
    return PromptRequest(**{**REQUEST.to_dict(), "request_id": f"{name}-{time.monotonic_ns()}", "stop": ()})


def wait(req: PromptRequest, timeout_s: float = 3) -> PipelineResult:
    return asyncio.run(services.infer_wait(request=req, timeout_s=timeout_s))


def test_done_event_becomes_the_result() -> None:
    req = request("done")
    result = PipelineResult(
        request_id=req.request_id, session_id="s", text="t", worker="echo", model="echo-1", finish_reason="stop", usage=Usage(1, 1), timings_us={"rag": 1}
    )
    get_bus().publish(req.request_id, "token", {"seq": 0, "text": "t"})
    get_bus().publish(req.request_id, "done", result.to_dict())
    assert wait(req) == result


def test_error_event_becomes_the_error() -> None:
    req = request("error")
    get_bus().publish(req.request_id, "error", WorkerTimeout("slow upstream", data={"worker": "openai"}).to_dict())
    with pytest.raises(WorkerTimeout) as info:
        wait(req)
    assert info.value.message == "slow upstream" and info.value.data == {"worker": "openai"}


def test_nothing_arrives_is_a_request_timeout_naming_the_request() -> None:
    req = request("silent")
    with pytest.raises(RequestTimeout) as info:
        wait(req, timeout_s=0.2)
    assert info.value.data == {"request_id": req.request_id} and req.request_id in info.value.message


def test_result_published_while_waiting() -> None:
    req = request("late")
    done = PipelineResult(request_id=req.request_id, session_id="s", text="x", worker="echo", model="m", finish_reason="stop", usage=Usage(), timings_us={})

    def later() -> None:
        time.sleep(0.2)
        get_bus().publish(req.request_id, "done", done.to_dict())

    thread = threading.Thread(target=later)
    thread.start()
    try:
        assert wait(req).text == "x"
    finally:
        thread.join()


@pytest.mark.django_db
def test_status_of_a_hash_without_a_tenant_is_not_found() -> None:
    get_bus().set_status("orphan", status="queued")
    with pytest.raises(services.NotFound):
        services.request_status_get(tenant_id="t", request_id="orphan")


def test_record_failure_writes_the_error_and_the_status() -> None:
    req = request("fail")
    services._record_failure(req, WorkerTimeout())
    events = get_bus().read_all(req.request_id)
    assert [e.type for e in events] == ["error"] and events[0].data["code"] == "worker_timeout"
    assert get_bus().get_status(req.request_id)["status"] == "failed"
