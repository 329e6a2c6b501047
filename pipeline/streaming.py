"""The streaming protocol's events, shared by SSE (``POST /api/v1/infer`` with
``"stream": true``) and the WebSocket (``/api/v1/stream``): ``start``, then
``token`` events with their sequence numbers, then ``done`` or ``error`` — one
terminal event, always (docs/streaming.md).

The events come from the request's token stream in Redis, which every reader
reads from any position at its own pace: an attached (deduplicated) request and
a resumed one read the same stream as the original.

Every generator here is closed by whoever reads it (``contextlib.aclosing``), so
that a client's leaving reaches the token bus at once: the reader signs out, and
the request stops when its last reader has gone (``tokenbus``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import structlog
from asgiref.sync import sync_to_async

from orchestrator_site.errors import OrchestratorError, RequestTimeout, ServiceUnavailable
from pipeline import services
from pipeline.config import get_config
from pipeline.resilience.local import shared_state
from pipeline.routing import cost_usd
from pipeline.tokenbus import get_bus
from pipeline.types import PipelineResult, PromptRequest

log = structlog.get_logger("pipeline.streaming")
Event = dict[str, Any]


def done_event(request_id: str, result: PipelineResult) -> Event:
    body = result.to_dict()
    return {
        "type": "done",
        "request_id": request_id,
        "finish_reason": body["finish_reason"],
        "worker": body["worker"],
        "model": body["model"],
        "usage": body["usage"],
        "cost": cost_usd(get_config(), result.worker, result.usage),
        "timings_us": body["timings_us"],
    }


def error_event(request_id: str | None, error: OrchestratorError) -> Event:
    return {"type": "error", "request_id": request_id, **error.to_dict()}


async def prompt_events(request: PromptRequest, started: services.Started, *, timeout_s: float) -> AsyncGenerator[Event, None]:
    """The events of a request the gateway has just started (``services.infer_start``)."""
    rid = request.request_id
    yield {"type": "start", "request_id": rid}
    if started.result is not None:  # answered from the deduplication window
        async for event in _whole(rid, started.result):
            yield event
        return
    if started.how == "inline":  # Redis is down: run here, answer in one piece
        async for event in _inline(request):
            yield event
        return
    async with contextlib.aclosing(stream_events(started.request_id, client_request_id=rid, timeout_s=timeout_s, rerun=request)) as events:
        async for event in events:
            yield event


async def stream_events(
    stream_id: str, *, client_request_id: str, timeout_s: float, after_seq: int = -1, rerun: PromptRequest | None = None
) -> AsyncGenerator[Event, None]:
    """Token, then done or error events from the stream ``stream_id``, after
    ``after_seq``, labelled with the client's request id (an attached request reads
    the stream of the identical request it shares). If Redis goes away before any
    token was sent, ``rerun`` (the client's request) is run here instead."""
    sent = False
    async with contextlib.aclosing(get_bus().events(stream_id, timeout_s=timeout_s)) as events:
        while True:
            try:
                event = await anext(events)
            except StopAsyncIteration:
                yield error_event(client_request_id, RequestTimeout(f"no result within {timeout_s:g}s", data={"request_id": client_request_id}))
                return
            except ServiceUnavailable as exc:
                shared_state.failed("stream the result", exc.__cause__ or exc)
                if sent or rerun is None:  # part of the answer is out (a rerun would repeat it), or nothing to rerun
                    yield error_event(client_request_id, ServiceUnavailable("the token stream was lost", data={"service": "redis"}))
                    return
                async for inline_event in _inline(rerun):
                    yield inline_event
                return
            if event.type == "token":
                seq = int(event.data.get("seq", 0))
                if seq > after_seq:
                    sent = True
                    yield {"type": "token", "request_id": client_request_id, "seq": seq, "text": str(event.data.get("text", ""))}
            elif event.type == "done":
                yield done_event(client_request_id, PipelineResult.from_dict(event.data))
                return
            elif event.type == "error":
                yield error_event(client_request_id, OrchestratorError.from_dict(event.data))
                return


async def _whole(request_id: str, result: PipelineResult) -> AsyncIterator[Event]:
    if result.text:
        yield {"type": "token", "request_id": request_id, "seq": 0, "text": result.text}
    yield done_event(request_id, result)


async def _inline(request: PromptRequest) -> AsyncIterator[Event]:
    try:
        result = await sync_to_async(services.infer_inline, thread_sensitive=False)(request=request)
    except OrchestratorError as exc:
        yield error_event(request.request_id, exc)
        return
    async for event in _whole(request.request_id, result):
        yield event


def sse_frame(event: Event) -> bytes:
    """One Server-Sent Event: the type as ``event:``, the JSON as ``data:``, the
    token's sequence number as ``id:`` (a client's Last-Event-ID)."""
    head = f"id: {event['seq']}\n" if event["type"] == "token" else ""
    return f"{head}event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
