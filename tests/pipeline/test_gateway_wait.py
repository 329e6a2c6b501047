"""How the gateway turns a request's token stream into a result or an error."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from orchestrator_site.errors import NotFound, RequestTimeout, ServiceUnavailable, WorkerTimeout
from pipeline import selectors, streaming
from pipeline.shared_redis import SharedRedis
from pipeline.tokenbus import TokenBus, get_bus, reader, set_bus
from pipeline.types import PipelineResult, PromptRequest, Usage
from tests.conftest import free_port

REQUEST = PromptRequest(request_id="", tenant_id="t", session_id="s", prompt="p", worker="echo", model="echo-1", max_tokens=5)


def request(name: str) -> PromptRequest:
    return PromptRequest(**{**REQUEST.to_dict(), "request_id": f"{name}-{time.monotonic_ns()}", "stop": ()})


def wait(req: PromptRequest, timeout_s: float = 3) -> PipelineResult:
    return asyncio.run(streaming.infer_wait(request_id=req.request_id, timeout_s=timeout_s))


def test_done_event_becomes_the_result() -> None:
    req = request("done")
    result = PipelineResult(
        request_id=req.request_id, session_id="s", text="t", worker="echo", model="echo-1", finish_reason="stop", usage=Usage(1, 1), timings_us={"rag": 1}
    )
    get_bus().append(req.request_id, "token", {"seq": 0, "text": "t"}, attempt=1)
    get_bus().append(req.request_id, "done", result.to_dict(), attempt=1)
    assert wait(req) == result


def test_error_event_becomes_the_error() -> None:
    req = request("error")
    get_bus().append(req.request_id, "error", WorkerTimeout("slow upstream", data={"worker": "openai"}).to_dict(), attempt=1)
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
        get_bus().append(req.request_id, "done", done.to_dict(), attempt=1)

    thread = threading.Thread(target=later)
    thread.start()
    try:
        assert wait(req).text == "x"
    finally:
        thread.join()


@pytest.mark.django_db
def test_status_of_a_hash_without_a_tenant_is_not_found() -> None:
    get_bus().set_record("orphan", status="queued")
    with pytest.raises(NotFound):
        selectors.request_status_for_tenant(tenant_id="t", request_id="orphan")


def test_a_stream_lost_to_redis_is_service_unavailable_never_a_second_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "OUTAGE_S", 0.2)
    set_bus(TokenBus(redis=SharedRedis(url=f"redis://127.0.0.1:{free_port()}/0", prefix="x", socket_timeout_s=0.5), maxlen=10, ttl_s=10))
    try:
        with pytest.raises(ServiceUnavailable) as info:
            wait(request("lost"))
    finally:
        set_bus(None)
    assert info.value.retry_after == 1.0 and info.value.data == {"service": "redis"}


def test_a_request_redis_forgot_in_a_restart_fails_at_once(tmp_path: Path) -> None:
    """A Redis that comes back without its data (no persistence) has lost the request's
    record: nobody can answer it any more, so the reader says so instead of waiting out
    the request's whole timeout; and the outage was told once, when it began."""
    from tests.pipeline.test_redis_outage import OwnRedis

    own = OwnRedis(tmp_path)
    own.start()
    bus = TokenBus(redis=SharedRedis(url=f"redis://127.0.0.1:{own.port}/0", prefix="lost", socket_timeout_s=0.5), maxlen=10, ttl_s=10)
    req = request("forgotten")
    bus.set_record(req.request_id, status="running", tenant_id="t")
    outages: list[BaseException] = []

    async def read() -> list[str]:
        return [e.type async for e in reader.read_events(bus, req.request_id, timeout_s=30, on_outage=outages.append)]

    def restart() -> None:
        time.sleep(0.3)
        own.stop()
        time.sleep(0.5)
        own.start()  # empty

    thread = threading.Thread(target=restart)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(ServiceUnavailable, match="lost with Redis's data") as info:
            asyncio.run(read())
    finally:
        thread.join()
        own.stop()
    assert time.monotonic() - started < 5 and info.value.retry_after == 1.0
    assert len(outages) == 1


def test_a_reader_of_a_known_request_reads_on_after_a_restart_that_kept_it(tmp_path: Path) -> None:
    from tests.pipeline.test_redis_outage import OwnRedis

    own = OwnRedis(tmp_path)
    own.start()
    bus = TokenBus(redis=SharedRedis(url=f"redis://127.0.0.1:{own.port}/0", prefix="kept", socket_timeout_s=0.5), maxlen=10, ttl_s=10)
    req = request("kept")

    def restart_and_recreate() -> None:
        time.sleep(0.3)
        own.stop()
        own.start()
        bus.set_record(req.request_id, status="running", tenant_id="t")  # as an AOF-backed Redis would have kept it
        time.sleep(0.3)
        bus.append(req.request_id, "done", PipelineResult(req.request_id, "s", "kept", "echo", "m", "stop", Usage(), {}).to_dict(), attempt=1)

    bus.set_record(req.request_id, status="running", tenant_id="t")
    set_bus(bus)
    thread = threading.Thread(target=restart_and_recreate)
    thread.start()
    try:
        assert wait(req, timeout_s=5).text == "kept"
    finally:
        thread.join()
        set_bus(None)
        own.stop()
