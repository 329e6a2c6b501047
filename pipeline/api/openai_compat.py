"""The OpenAI-compatible API: ``POST /v1/chat/completions`` (streaming or not) and
``GET /v1/models``, authenticated by the tenant's key as the bearer token, so
that the official ``openai`` SDK (or any client of that API) works unchanged
with ``base_url=<gateway>/v1``.

Models are named ``<worker>/<model>`` (``openai/gpt-4o-mini``); a bare worker
name means its default model, and a bare model name the one worker serving it.
Requests run through the same pipeline as ``/api/v1/infer`` (limits,
deduplication, the five stages); errors are OpenAI's shape (``pipeline.api.errors``),
which the SDK raises as its own exception classes.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncGenerator
from typing import Any

from adrf.views import APIView as AsyncAPIView
from django.http import HttpResponse, StreamingHttpResponse
from drf_spectacular.utils import extend_schema
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from orchestrator_site.errors import OrchestratorError, UnknownModel
from pipeline import streaming
from pipeline.api.errors import openai_body
from pipeline.api.inputs import ChatCompletionInput, validated
from pipeline.api.parsers import LimitedJSONParser
from pipeline.api.views import EventStreamRenderer, asks_for_a_fresh_answer, json_answer, refuse_event_stream_for_a_whole_answer, sse_response, tenant_of
from pipeline.config import PipelineSettings, get_config
from pipeline.services import gates, routes, start
from pipeline.types import ChatMessage, PipelineResult


def resolve_model(config: PipelineSettings, name: str) -> tuple[str, str]:
    """``<worker>/<model>``, a worker's name, or a model one worker serves."""
    worker, _, model = name.partition("/")
    if worker in config.workers:
        return worker, model or config.workers[worker].model_default
    serving = [w for w, cfg in config.workers.items() if name in cfg.models or name == cfg.model_default]
    if len(serving) == 1:
        return serving[0], name
    raise UnknownModel(f"no model named {name!r}; GET /v1/models lists them", data={"model": name, "available": model_ids(config)})


def model_ids(config: PipelineSettings) -> list[str]:
    ids: list[str] = []
    for worker, cfg in config.workers.items():
        models = list(cfg.models) or [cfg.model_default]
        ids.extend(f"{worker}/{m}" for m in models if m)
    return sorted(set(ids))


class ModelsApi(APIView):
    @extend_schema(operation_id="openai_models", responses={200: dict})
    def get(self, request: Request) -> Response:
        tenant_of(request)
        return Response({"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": m.split("/")[0]} for m in model_ids(get_config())]})


class ChatCompletionsApi(AsyncAPIView):
    parser_classes = [LimitedJSONParser]
    renderer_classes = [JSONRenderer, EventStreamRenderer]

    @extend_schema(operation_id="openai_chat_completions", request=ChatCompletionInput, responses={200: dict})
    async def post(self, request: Request) -> HttpResponse | StreamingHttpResponse:
        principal = tenant_of(request)
        data = validated(ChatCompletionInput, request.data)
        if not data.stream:
            refuse_event_stream_for_a_whole_answer(request)
        config = get_config()
        prompt = data.conversation()[1]
        route = None
        if data.model in config.routes:  # a route group: "model": "auto", say
            route = await routes.aroute(config, data.model, {"prompt": prompt.content}, tenant_id=principal.tenant_id, api_key_id=principal.api_key.id)
        worker, model = (route.worker, route.model) if route else resolve_model(config, data.model)
        fields = data.request_fields(worker=worker, model=model, max_prompt_chars=config.limits.max_prompt_chars)
        prompt_request = start.infer_build_request(
            tenant_id=principal.tenant_id,
            api_key_id=principal.api_key.id,
            route=route,
            data=fields,
            config=config,
            tenant_has_documents=principal.tenant.has_documents,
            stream=data.stream,
            fresh=asks_for_a_fresh_answer(request),
        )
        started = await start.ainfer_start(request=prompt_request, rates=gates.tenant_rates(principal.tenant, config))
        name = f"{worker}/{model}"
        wait_s = streaming.wait_s(config.limits.request_timeout_s)
        if data.stream:
            events = streaming.prompt_events(prompt_request, started, timeout_s=wait_s)
            return _chunk_stream(events, name, bool(data.stream_options and data.stream_options.include_usage))
        result = await streaming.answer_of(prompt_request, started, timeout_s=wait_s)
        return json_answer(_completion(prompt_request.request_id, result, name))


def _completion(request_id: str, result: PipelineResult, model: str) -> dict[str, Any]:
    return completion_body(
        request_id=request_id,
        model=model,
        created=int(time.time()),
        message=ChatMessage("assistant", result.text, tool_calls=result.tool_calls),
        logprobs=None if result.logprobs is None else list(result.logprobs),
        finish_reason=result.finish_reason,
        usage=result.usage.to_dict(),
        sources=[source.to_dict() for source in result.sources],
    )


def completion_body(
    *,
    request_id: str,
    model: str,
    created: int,
    message: ChatMessage,
    logprobs: list[Any] | None,
    finish_reason: str,
    usage: dict[str, Any],
    sources: list[dict[str, Any]],
) -> dict[str, Any]:
    """A ``chat.completion`` object, as ``/v1/chat/completions`` answers and as a batch's
    output file holds it."""
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "message": message.to_dict(), "logprobs": None if logprobs is None else {"content": logprobs}, "finish_reason": finish_reason}
        ],
        "usage": usage,
        # An extension, as OpenAI-compatible servers add fields: the documents a RAG answer used.
        "sources": sources,
    }


def _chunk_stream(events: AsyncGenerator[streaming.Event, None], model: str, include_usage: bool) -> StreamingHttpResponse:
    created = int(time.time())

    def chunk(request_id: str, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    async def openai_events() -> AsyncGenerator[dict[str, Any], None]:
        async with contextlib.aclosing(events):
            async for event in events:
                rid = event["request_id"]
                if event["type"] == "start":
                    yield {"data": chunk(rid, {"role": "assistant", "content": ""})}
                elif event["type"] == "token":
                    yield {"data": _token_chunk(chunk(rid, {"content": event["text"]}), event)}
                elif event["type"] == "failover":
                    # An extension, as "sources" is: an empty delta saying who goes on (SDKs keep unknown fields).
                    yield {"data": {**chunk(rid, {}), "failover": {k: event[k] for k in ("from", "to", "model", "error")}}}
                elif event["type"] == "done":
                    yield {"data": {**chunk(rid, {}, event["finish_reason"]), "sources": event.get("sources", [])}}
                    if include_usage:
                        yield {"data": {**chunk(rid, {}), "choices": [], "usage": event["usage"]}}
                    yield {"done": True}
                elif event["type"] == "error":
                    # What OpenAI sends when a stream fails: the SDK raises it as an APIError.
                    yield {"data": openai_body(OrchestratorError.from_dict(event))}
                    return

    crashed = {"data": openai_body(OrchestratorError("internal error"))}
    return sse_response(openai_events(), frame=_openai_frame, crashed=crashed)


def _token_chunk(chunk: dict[str, Any], event: streaming.Event) -> dict[str, Any]:
    """A token event as a chunk: its text, tool-call deltas and logprobs."""
    choice = chunk["choices"][0]
    if event.get("tool_calls"):
        choice["delta"] = {"content": event["text"] or None, "tool_calls": event["tool_calls"]}
    if event.get("logprobs"):
        choice["logprobs"] = {"content": event["logprobs"]}
    return chunk


def _openai_frame(item: dict[str, Any]) -> bytes:
    if item.get("done"):
        return b"data: [DONE]\n\n"
    return b"data: " + json.dumps(item["data"], separators=(",", ":")).encode() + b"\n\n"
