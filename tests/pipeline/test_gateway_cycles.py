"""Requests through the whole gateway (the ASGI application, its middleware, the DRF
views, a real real-time worker) leave nothing for the cycle collector. Every object
left in a reference cycle waits for a collection, and the gateway's collections
paused it for several milliseconds every few hundred requests: a streamed request's
first token waited behind them (BENCHMARKS.md)."""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

import pytest
from rest_framework.response import Response

from orchestrator_site import asgi
from pipeline.api.views import AcyclicAPIView
from tests.conftest import TenantFixture, WorkerProcess, asgi_request, left_for_the_collector

CHAT = {"model": "echo/echo-1", "messages": [{"role": "user", "content": "hi"}]}
REQUESTS: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "infer, streamed (SSE)": ("POST", "/api/v1/infer", {"prompt": "hello", "stream": True}),
    "infer, answered as JSON": ("POST", "/api/v1/infer", {"prompt": "hello"}),
    "chat completion, streamed": ("POST", "/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}}),
    "chat completion": ("POST", "/v1/chat/completions", CHAT),
    "models": ("GET", "/v1/models", None),
    "documents": ("GET", "/api/v1/documents", None),
}


def each_body_unique(body: dict[str, Any] | None, n: int) -> bytes:
    """A fresh prompt each time: deduplication would answer a repeat from the window."""
    if body is None:
        return b""
    if "prompt" in body:
        return json.dumps({**body, "prompt": f"{body['prompt']} {n}"}).encode()
    return json.dumps({**body, "messages": [{"role": "user", "content": f"hi {n}"}]}).encode()


def collected_after(owner: TenantFixture, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, list[int], list[bytes]]:
    headers = {"authorization": f"Bearer {owner.key}", "content-type": "application/json"}

    async def one(n: int) -> list[dict[str, Any]]:
        return await asgi_request(asgi.application, method, path, body=each_body_unique(body, n), headers=headers)

    # The first calls warm the tenant's key, the connections and the scripts.
    collected, replies = asyncio.run(left_for_the_collector(one))
    return collected, [r[0]["status"] for r in replies], [b"".join(m.get("body", b"") for m in r) for r in replies]


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
@pytest.mark.parametrize("name", list(REQUESTS))
def test_a_request_through_the_gateway_leaves_nothing_for_the_cycle_collector(name: str, realtime_worker: WorkerProcess, owner: TenantFixture) -> None:
    method, path, body = REQUESTS[name]
    collected, statuses, bodies = collected_after(owner, method, path, body)
    assert statuses == [200] * 10, bodies[0]
    if body is not None:  # answered by the worker, each its own prompt
        assert all(b"hi " in reply or b"hello " in reply for reply in bodies) and len(set(bodies)) == 10
    assert collected == 0


class Echo(AcyclicAPIView):
    authentication_classes: list[Any] = []
    permission_classes: list[Any] = []

    def get(self, request: Any) -> Response:
        return Response({"echo": request.query_params.get("q", "")})

    def post(self, request: Any) -> Response:
        return Response({"echo": request.data})


def test_a_view_keeps_working_after_its_links_are_dropped() -> None:
    """The parsed body stays readable after the response is final, a GET view answers
    HEAD, and the rendered body is the whole answer."""
    from django.test import RequestFactory

    factory = RequestFactory()
    view = Echo.as_view()
    posted = view(factory.post("/echo", data={"a": [1, 2]}, content_type="application/json"))
    posted.render()
    assert json.loads(posted.content) == {"echo": {"a": [1, 2]}} and posted.renderer_context == {}
    assert posted.data == {"echo": {"a": [1, 2]}}
    head = view(factory.head("/echo?q=x"))
    head.render()
    assert head.status_code == 200 and json.loads(head.content) == {"echo": "x"}
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            view(factory.get("/echo?q=y")).render()
        assert gc.collect() == 0
    finally:
        gc.enable()
