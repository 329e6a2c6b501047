"""The streaming protocol's events, shared by SSE (``POST /api/v1/infer`` with
``"stream": true``, ``/v1/chat/completions``) and the WebSocket
(``/api/v1/stream``): ``start``, then ``token`` events with their sequence
numbers (and a ``failover`` among them where the answer went on on another
worker), then ``done`` or ``error`` — one terminal event, always
(docs/streaming.md).

The events come from the request's token stream in Redis, which every reader
reads from any position at its own pace: an attached (deduplicated) request and
a resumed one read the same stream as the original. A request is never run a
second time here: if Redis fails while a run may be answering, the client gets
``service_unavailable`` once the reader gives up.

Every generator here is closed by whoever reads it (``contextlib.aclosing``), so
that a client's leaving reaches the token bus at once: the reader signs out, and
the run stops when its last reader has gone (``tokenbus.producer``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from asgiref.sync import sync_to_async

from orchestrator_site.errors import OrchestratorError, RequestTimeout, ServiceUnavailable
from pipeline.config import get_config
from pipeline.resilience.local import shared_state
from pipeline.routing import cost_usd
from pipeline.services import inline
from pipeline.services.gates import DEADLINE_GRACE_S
from pipeline.services.start import Started
from pipeline.tokenbus import get_bus
from pipeline.tokenbus.reader import read_events
from pipeline.types import PipelineResult, PromptRequest

Event = dict[str, Any]


def wait_s(request_timeout_s: float) -> float:
    """How long a client waits for a request: its deadline, plus the time for the run's
    own ``worker_timeout`` to arrive."""
    return request_timeout_s + DEADLINE_GRACE_S


def done_event(request_id: str, result: PipelineResult) -> Event:
    body = result.to_dict()
    config = get_config()
    cost = sum(cost_usd(config, leg.worker, leg.usage) for leg in result.legs) if result.legs else cost_usd(config, result.worker, result.usage)
    event: Event = {
        "type": "done",
        "request_id": request_id,
        "finish_reason": body["finish_reason"],
        "worker": body["worker"],
        "model": body["model"],
        "usage": body["usage"],
        "cost": round(cost, 10),
        "timings_us": body["timings_us"],
        "sources": body["sources"],
        "tool_calls": body["tool_calls"],
    }
    if result.legs:  # the answer failed over: each provider's part
        event["legs"] = body["legs"]
    return event


def token_event(request_id: str, seq: int, data: dict[str, Any]) -> Event:
    """A token event: the piece's text, and its tool-call deltas and logprobs when it has them."""
    event: Event = {"type": "token", "request_id": request_id, "seq": seq, "text": str(data.get("text", ""))}
    for extra in ("tool_calls", "logprobs"):
        if data.get(extra):
            event[extra] = data[extra]
    return event


def failover_event(request_id: str, seq: int, marker: dict[str, Any]) -> Event:
    """The answer goes on on another worker: ``from`` failed with ``error`` after the
    tokens before this event; ``to`` (with ``model``) continues from there."""
    return {"type": "failover", "request_id": request_id, "seq": seq, **{k: marker.get(k) for k in ("from", "to", "model", "error")}}


def whole_token(request_id: str, result: PipelineResult) -> Event | None:
    """A whole answer as one token event (None when it has neither text nor tool calls)."""
    if not result.text and not result.tool_calls:
        return None
    data = {"text": result.text, "tool_calls": [call.delta(place) for place, call in enumerate(result.tool_calls)], "logprobs": result.logprobs}
    return token_event(request_id, 0, data)


def error_event(request_id: str | None, error: OrchestratorError) -> Event:
    return {"type": "error", "request_id": request_id, **error.to_dict()}


async def prompt_events(request: PromptRequest, started: Started, *, timeout_s: float) -> AsyncGenerator[Event, None]:
    """The events of a request the gateway has just started (``services.start``)."""
    rid = request.request_id
    yield {"type": "start", "request_id": rid, **({"route": dict(request.route)} if request.route else {})}
    if started.result is not None:  # answered from the deduplication window
        async for event in _whole(rid, started.result):
            yield event
        return
    if not started.on_the_bus:  # Redis is down: run here, answer in one piece
        async for event in _local(request):
            yield event
        return
    async with contextlib.aclosing(stream_events(started.request_id, client_request_id=rid, timeout_s=timeout_s)) as events:
        async for event in events:
            yield event


async def stream_events(stream_id: str, *, client_request_id: str, timeout_s: float, after_seq: int = -1) -> AsyncGenerator[Event, None]:
    """Token, then done or error events from the stream ``stream_id``, after
    ``after_seq``, labelled with the client's request id (an attached request reads
    the stream of the identical request it shares)."""
    events = read_events(get_bus(), stream_id, timeout_s=timeout_s, on_outage=_redis_failed)
    tokens = 0
    async with contextlib.aclosing(events):
        while True:
            try:
                event = await anext(events)
            except StopAsyncIteration:
                yield error_event(client_request_id, RequestTimeout(f"no result within {timeout_s:g}s", data={"request_id": client_request_id}))
                return
            except ServiceUnavailable:
                yield error_event(client_request_id, ServiceUnavailable("the token stream was lost", data={"service": "redis"}, retry_after=1.0))
                return
            if event.type == "token":
                seq = int(event.data.get("seq", 0))
                tokens += 1
                if seq > after_seq and isinstance(event.data.get("failover"), dict):
                    yield failover_event(client_request_id, seq, event.data["failover"])
                elif seq > after_seq:
                    yield token_event(client_request_id, seq, event.data)
            elif event.type == "done":
                result = PipelineResult.from_dict(event.data)
                whole = whole_token(client_request_id, result) if not tokens and after_seq < 0 else None
                if whole is not None:
                    # A whole answer (its first client did not stream): one token, as from the window.
                    yield whole
                yield done_event(client_request_id, result)
                return
            elif event.type == "error":
                yield error_event(client_request_id, OrchestratorError.from_dict(event.data))
                return


async def infer_wait(*, request_id: str, timeout_s: float) -> PipelineResult:
    """The answer of the request whose stream is ``request_id``, read whole (the
    non-streaming endpoints), or its error raised."""
    events = read_events(get_bus(), request_id, timeout_s=timeout_s, on_outage=_redis_failed)
    async with contextlib.aclosing(events):
        while True:
            try:
                event = await anext(events)
            except StopAsyncIteration:
                break
            except ServiceUnavailable as exc:
                raise ServiceUnavailable("the token stream was lost", data={"service": "redis"}, retry_after=1.0) from exc
            if event.type == "done":
                return PipelineResult.from_dict(event.data)
            if event.type == "error":
                raise OrchestratorError.from_dict(event.data)
    raise RequestTimeout(f"no result within {timeout_s:g}s; poll GET /api/v1/status/{request_id}", data={"request_id": request_id})


async def answer_of(request: PromptRequest, started: Started, *, timeout_s: float) -> PipelineResult:
    """A started request's whole answer (the non-streaming endpoints), or its error raised."""
    if started.result is not None:
        return started.result
    if not started.on_the_bus:
        return await sync_to_async(inline.infer_local, thread_sensitive=False)(request=request)
    return await infer_wait(request_id=started.request_id, timeout_s=timeout_s)


def _redis_failed(cause: BaseException) -> None:
    shared_state.failed("read the token bus", cause)


async def _whole(request_id: str, result: PipelineResult) -> AsyncIterator[Event]:
    whole = whole_token(request_id, result)
    if whole is not None:
        yield whole
    yield done_event(request_id, result)


async def _local(request: PromptRequest) -> AsyncIterator[Event]:
    try:
        result = await sync_to_async(inline.infer_local, thread_sensitive=False)(request=request)
    except OrchestratorError as exc:
        yield error_event(request.request_id, exc)
        return
    async for event in _whole(request.request_id, result):
        yield event


def sse_frame(event: Event) -> bytes:
    """One Server-Sent Event: the type as ``event:``, the JSON as ``data:``, the
    token's sequence number as ``id:`` (a client's Last-Event-ID)."""
    head = f"id: {event['seq']}\n" if event["type"] in ("token", "failover") else ""
    return f"{head}event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
