"""The streaming endpoints and the ``Accept`` header: what SSE clients send is served,
what cannot be satisfied is a real 406. Through a real gateway and worker, read with
a real SSE client library (httpx-sse)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from httpx_sse import EventSource

from tests.conftest import Fakes, TenantFixture, WorkerProcess, start_gateway, stop_process

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SERVED = [
    None,
    "*/*",
    "application/json",
    "text/event-stream",
    "text/event-stream, application/json;q=0.9",
    "application/json;q=0.5, text/event-stream;q=0.8, */*;q=0.1",
    "text/*",
]
ENDPOINTS = {
    "/api/v1/infer": {"prompt": "accept me"},
    "/v1/chat/completions": {"model": "echo", "messages": [{"role": "user", "content": "accept me"}]},
}


@pytest.fixture(scope="module")
def gateway(realtime_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_gateway(tmp_path_factory.mktemp("accept") / "gateway.log")
    yield url
    stop_process(proc)


def headers(key: str, accept: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **({"Accept": accept} if accept is not None else {})}


@pytest.mark.parametrize("accept", SERVED)
@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_a_stream_is_served_whatever_an_sse_client_accepts(gateway: str, owner: TenantFixture, fakes: Fakes, path: str, accept: str | None) -> None:
    with (
        httpx.Client(timeout=30, headers=headers(owner.key, accept)) as client,
        client.stream("POST", f"{gateway}{path}", json={**ENDPOINTS[path], "stream": True}) as resp,
    ):
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = list(EventSource(resp).iter_sse())
    if path == "/api/v1/infer":
        assert next(e.event for e in events) == "start" and events[-1].event == "done"
    else:
        assert events[-1].data == "[DONE]" and "accept me" in "".join(e.data for e in events)


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_an_accept_nothing_here_satisfies_is_406(gateway: str, owner: TenantFixture, path: str) -> None:
    resp = httpx.post(f"{gateway}{path}", json={**ENDPOINTS[path], "stream": True}, headers=headers(owner.key, "text/html, application/xml;q=0.9"))
    assert resp.status_code == 406, resp.text
    assert resp.json()["error"]["code"] == "not_acceptable"


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_a_whole_answer_is_json_and_not_an_event_stream(gateway: str, owner: TenantFixture, path: str) -> None:
    whole = httpx.post(f"{gateway}{path}", json=ENDPOINTS[path], headers=headers(owner.key, "application/json"), timeout=30)
    assert whole.status_code == 200 and whole.headers["content-type"] == "application/json"
    refused = httpx.post(f"{gateway}{path}", json=ENDPOINTS[path], headers=headers(owner.key, "text/event-stream"), timeout=30)
    assert refused.status_code == 406 and refused.headers["content-type"].startswith("text/event-stream")
    (event,) = list(EventSource(refused).iter_sse())
    if path.startswith("/v1/"):  # as OpenAI frames a failed stream: a data line holding the error
        assert event.event == "message" and event.json()["error"]["code"] == "not_acceptable"
    else:
        assert event.event == "error" and event.json()["code"] == "not_acceptable"


def test_the_event_stream_renderer_frames_an_error_and_nothing_else() -> None:
    from pipeline.api.views import EventStreamRenderer

    framed = EventStreamRenderer().render({"error": {"code": "rate_limited", "message": "slow down", "data": {"retry_after": 2}}})
    assert framed.startswith(b"event: error\ndata: ") and b'"code":"rate_limited"' in framed and b'"retry_after":2' in framed
    other = EventStreamRenderer().render({"text": "a whole answer"})
    assert b'"code":"internal_error"' in other and b"a whole answer" not in other
