"""The HTTP API: each view validates, calls one service, renders."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any

import structlog
from adrf.views import APIView as AsyncAPIView
from django.http import HttpResponse, StreamingHttpResponse
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from orchestrator_site.errors import ApiKeyMissing, NotAcceptable, OrchestratorError
from pipeline import selectors, streaming
from pipeline.api import serializers as s
from pipeline.api.errors import is_openai_path
from pipeline.api.inputs import InferInput, validated
from pipeline.api.pagination import paginated
from pipeline.api.parsers import LimitedJSONParser
from pipeline.auth import TenantPrincipal
from pipeline.config import get_config
from pipeline.services import documents, gates, routes, start
from pipeline.tokenbus import RequestStatus

log = structlog.get_logger("pipeline.api")

EVENT_STREAM = "text/event-stream"


class EventStreamRenderer(BaseRenderer):
    """``text/event-stream``, for the endpoints that stream: a client that asks for it
    (``Accept``) is served. A streamed answer is a ``StreamingHttpResponse`` and never
    passes through here; an error before the stream starts does, as one SSE ``error``
    event."""

    media_type = EVENT_STREAM
    format = "sse"
    charset = None

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Mapping[str, Any] | None = None) -> bytes:
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict) and is_openai_path((renderer_context or {}).get("request")):
            return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"  # as OpenAI frames a failed stream
        if not isinstance(error, dict):
            error = OrchestratorError("only a stream is served as text/event-stream").to_dict()
        return streaming.sse_frame(streaming.error_event(None, OrchestratorError.from_dict(error)))


def sse_response(events: AsyncGenerator[Any, None], *, frame: Callable[[Any], bytes] = streaming.sse_frame, crashed: Any = None) -> StreamingHttpResponse:
    """``text/event-stream``, each event framed and sent as it comes (docs/streaming.md)."""
    last = crashed if crashed is not None else streaming.error_event(None, OrchestratorError("internal error"))

    async def frames() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield frame(event)
        except Exception as exc:  # stream boundary: the client gets a last error event, never a hung response
            log.exception("stream_crashed", outcome="error", error_type=type(exc).__name__)
            yield frame(last)
        finally:
            await events.aclose()  # the client left: sign out of the stream now

    response = StreamingHttpResponse(frames(), content_type=EVENT_STREAM)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # no proxy buffering (nginx)
    return response


def json_answer(data: Any, *, status: int = 200) -> HttpResponse:
    """``data`` as JSON, rendered here, on the event loop. Django renders a DRF
    ``Response`` after the view, through ``sync_to_async``: a hop into the request's
    own thread, started for it, between the answer and the client. A plain
    ``HttpResponse`` has nothing left to render."""
    return HttpResponse(JSONRenderer().render(data), content_type="application/json", status=status)


def refuse_event_stream_for_a_whole_answer(request: Request) -> None:
    """A client that accepts only ``text/event-stream`` asked for a whole (JSON) answer."""
    renderer = getattr(request, "accepted_renderer", None)
    if isinstance(renderer, EventStreamRenderer):
        raise NotAcceptable('this request is answered as application/json; send "stream": true for text/event-stream')


def asks_for_a_fresh_answer(request: Request) -> bool:
    """``Cache-Control: no-cache`` (or ``no-store``): share no answer with an identical request."""
    directives = {d.strip().split("=", 1)[0].lower() for d in request.headers.get("Cache-Control", "").split(",")}
    return bool(directives & {"no-cache", "no-store"})


def tenant_of(request: Request) -> TenantPrincipal:
    principal = request.user
    if not isinstance(principal, TenantPrincipal):  # IsTenant has run; this keeps the types honest
        raise ApiKeyMissing()
    return principal


_ERRORS = {code: OpenApiResponse(s.ErrorOut) for code in (400, 401, 404, 406, 413, 415, 429, 503, 504)}


class InferApi(AsyncAPIView):
    parser_classes = [LimitedJSONParser]
    renderer_classes = [JSONRenderer, EventStreamRenderer]

    @extend_schema(request=InferInput, responses={200: s.InferResult, 202: s.InferQueued, **_ERRORS}, operation_id="infer")
    async def post(self, request: Request) -> HttpResponse | StreamingHttpResponse:
        principal = tenant_of(request)
        data = validated(InferInput, request.data)
        if not data.stream:
            refuse_event_stream_for_a_whole_answer(request)
        config = get_config()
        fields = data.fields()
        route = await routes.aroute_if_grouped(config, fields, tenant_id=principal.tenant_id, api_key_id=principal.api_key.id)
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
        wait_s = streaming.wait_s(config.limits.request_timeout_s)
        if data.stream:
            return sse_response(streaming.prompt_events(prompt_request, started, timeout_s=wait_s))
        # Redis down: answered here and now, even with "wait": false (no status to poll).
        if data.wait or started.kind is start.StartKind.LOCAL:
            result = await streaming.answer_of(prompt_request, started, timeout_s=wait_s)
            return json_answer({**result.to_dict(), **({"route": dict(prompt_request.route)} if prompt_request.route else {})})
        status = RequestStatus.COMPLETED if started.result else RequestStatus.QUEUED
        return json_answer({"request_id": started.request_id, "status": status.value}, status=202)


def iso_utc(epoch: str | None) -> str | None:
    """An epoch-seconds field of a request's record as ISO 8601 UTC, as every time on this API."""
    if not epoch:
        return None
    return dt.datetime.fromtimestamp(float(epoch), tz=dt.UTC).isoformat()


class RequestStatusApi(APIView):
    @extend_schema(responses={200: s.RequestStatusOut, 401: s.ErrorOut, 404: s.ErrorOut}, operation_id="request_status")
    def get(self, request: Request, request_id: str) -> Response:
        record = selectors.request_status_for_tenant(tenant_id=tenant_of(request).tenant_id, request_id=request_id)
        return Response(
            {
                "request_id": request_id,
                "session_id": record.get("session_id", ""),
                "status": record.get("status", RequestStatus.QUEUED.value),
                "created_at": iso_utc(record.get("created_at")),
                "updated_at": iso_utc(record.get("updated_at")),
            }
        )


class RequestResultApi(APIView):
    @extend_schema(responses={200: s.InferResult, 202: s.InferQueued, **_ERRORS}, operation_id="request_result")
    def get(self, request: Request, request_id: str) -> Response:
        status, result = selectors.request_result_for_tenant(tenant_id=tenant_of(request).tenant_id, request_id=request_id)
        if result is None:  # still queued or running: one status read, not two
            return Response({"request_id": request_id, "status": status}, status=202)
        return Response(result.to_dict())


def _document_out(doc: Any) -> dict[str, Any]:
    return {"id": str(doc.id), "title": doc.title, "body": doc.body, "metadata": doc.metadata, "created_at": doc.created_at.isoformat()}


class DocumentListCreateApi(APIView):
    @extend_schema(responses={200: s.DocumentOut(many=True), 400: s.ErrorOut, 401: s.ErrorOut}, operation_id="documents_list")
    def get(self, request: Request) -> Response:
        return paginated(request, selectors.documents_of_tenant(tenant_id=tenant_of(request).tenant_id), _document_out)

    @extend_schema(request=s.DocumentInput, responses={201: s.DocumentOut, 400: s.ErrorOut, 401: s.ErrorOut}, operation_id="documents_create")
    def post(self, request: Request) -> Response:
        data = s.validated(s.DocumentInput, request.data)
        doc = documents.document_create(tenant=tenant_of(request).tenant, title=data["title"], body=data["body"], metadata=data.get("metadata"))
        return Response(_document_out(doc), status=201)


class DocumentDetailApi(APIView):
    @extend_schema(responses={200: s.DocumentOut, 401: s.ErrorOut, 404: s.ErrorOut}, operation_id="documents_get")
    def get(self, request: Request, document_id: str) -> Response:
        doc = selectors.document_get_for_tenant(tenant_id=tenant_of(request).tenant_id, document_id=document_id)
        return Response(_document_out(doc))

    @extend_schema(responses={204: None, 401: s.ErrorOut, 404: s.ErrorOut}, operation_id="documents_delete")
    def delete(self, request: Request, document_id: str) -> Response:
        documents.document_delete(tenant_id=tenant_of(request).tenant_id, document_id=document_id)
        return Response(status=204)
