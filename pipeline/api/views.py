"""The HTTP API: each view validates, calls one service, renders."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import structlog
from adrf.views import APIView as AsyncAPIView
from asgiref.sync import sync_to_async
from django.core.exceptions import PermissionDenied
from django.http import Http404, StreamingHttpResponse
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.exceptions import APIException
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from orchestrator_site.errors import ApiKeyMissing, InvalidRequest, OrchestratorError
from pipeline import selectors, services, streaming
from pipeline.api import serializers as s
from pipeline.api.parsers import LimitedJSONParser
from pipeline.auth import TenantPrincipal, aresolve_api_key
from pipeline.config import get_config

log = structlog.get_logger("pipeline.api")


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

    response = StreamingHttpResponse(frames(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # no proxy buffering (nginx)
    return response


def tenant_of(request: Request) -> TenantPrincipal:
    principal = request.user
    if not isinstance(principal, TenantPrincipal):  # IsTenant has run; this keeps the types honest
        raise ApiKeyMissing()
    return principal


_ERRORS = {code: OpenApiResponse(s.ErrorOut) for code in (400, 401, 404, 413, 415, 429, 503, 504)}


def _forget_renderer_context(response: Response) -> None:
    # DRF set it (untyped); it held the view, the request and the response.
    response.renderer_context = {}  # type: ignore[attr-defined]


class LeavesNoCycles:
    """A DRF view whose requests leave nothing for the cycle collector. DRF links a
    request, its view and its response in reference cycles: the request's
    ``parser_context`` holds the request and the view (which holds the request), a
    response's ``renderer_context`` the view, the request and the response, and Django's
    ``setup`` gives a view with ``get`` a ``head`` bound to itself. Only the collector
    freed them, in pauses of several milliseconds every few hundred requests
    (BENCHMARKS.md). Once the response is final the links go: a body already parsed
    keeps its data, and the renderer's context is dropped once it has rendered."""

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        response = super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]
        context = getattr(request, "parser_context", None)
        if context:
            context.pop("view", None)
            context.pop("request", None)
        self.__dict__.pop("head", None)
        if isinstance(response, Response):
            response.add_post_render_callback(_forget_renderer_context)
        return response


class AcyclicAPIView(LeavesNoCycles, APIView):
    """DRF's ``APIView``, leaving no reference cycles (``LeavesNoCycles``)."""


class TenantAsyncAPIView(LeavesNoCycles, AsyncAPIView):
    """An async view whose checks run on the event loop. adrf runs DRF's ``initial``
    (authentication, permissions) in the one thread of sync work, a hop that every
    request waited its turn for; here the key is resolved first (from the gateway's
    cache, with no I/O, or from Postgres), and ``initial`` has no I/O left to do."""

    async def async_dispatch(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        await aresolve_api_key(request)
        self.args, self.kwargs = args, kwargs
        request = self.initialize_request(request, *args, **kwargs)
        self.request = request
        self.headers = self.default_response_headers
        try:
            self.initial(request, *args, **kwargs)
            method = request.method.lower()
            handler: Any = getattr(self, method, self.http_method_not_allowed) if method in self.http_method_names else self.http_method_not_allowed
            response = await handler(request, *args, **kwargs)
        except (OrchestratorError, APIException, Http404, PermissionDenied) as exc:
            # What DRF's handle_exception answers (the API's error shape); anything else is
            # a bug, which it would raise again, as it does here (handler500 renders it).
            response = self.handle_exception(exc)
        self.response = self.finalize_response(request, response, *args, **kwargs)
        return self.response


class InferApi(TenantAsyncAPIView):
    parser_classes = [LimitedJSONParser]

    @extend_schema(request=s.InferInput, responses={200: s.InferResult, 202: s.InferQueued, **_ERRORS}, operation_id="infer")
    async def post(self, request: Request) -> Response | StreamingHttpResponse:
        principal = tenant_of(request)
        data = s.validated(s.InferInput, request.data)
        config = get_config()
        prompt_request = services.infer_build_request(tenant_id=principal.tenant_id, data=data, config=config)
        rates = services.tenant_rates(principal.tenant, config)
        # Broker and Redis I/O is blocking: keep it off the event loop.
        started = await services.ainfer_start(request=prompt_request, rates=rates)
        if data["stream"]:
            return sse_response(streaming.prompt_events(prompt_request, started, timeout_s=config.limits.request_timeout_s))
        if started.how == "inline":
            # Redis is down: answered here and now, even with "wait": false (there is
            # no status to poll without Redis).
            result = await sync_to_async(services.infer_inline, thread_sensitive=False)(request=prompt_request)
            return Response(result.to_dict())
        if not data["wait"]:
            return Response({"request_id": started.request_id, "status": "completed" if started.result else "queued"}, status=202)
        if started.result is not None:
            return Response(started.result.to_dict())
        answering = dataclasses.replace(prompt_request, request_id=started.request_id)
        result = await services.infer_wait(request=answering, timeout_s=config.limits.request_timeout_s)
        return Response(result.to_dict())


class RequestStatusApi(AcyclicAPIView):
    @extend_schema(responses={200: s.RequestStatusOut, 401: s.ErrorOut, 404: s.ErrorOut}, operation_id="request_status")
    def get(self, request: Request, request_id: str) -> Response:
        status = services.request_status_get(tenant_id=tenant_of(request).tenant_id, request_id=request_id)
        return Response(
            {
                "request_id": request_id,
                "session_id": status.get("session_id", ""),
                "status": status.get("status", "queued"),
                "created_at": float(status.get("created_at", 0)),
                "updated_at": float(status.get("updated_at", 0)),
            }
        )


class RequestResultApi(AcyclicAPIView):
    @extend_schema(responses={200: s.InferResult, 202: s.InferQueued, **_ERRORS}, operation_id="request_result")
    def get(self, request: Request, request_id: str) -> Response:
        status, result = services.request_result_get(tenant_id=tenant_of(request).tenant_id, request_id=request_id)
        if result is None:  # still queued or running: one status read, not two
            return Response({"request_id": request_id, "status": status}, status=202)
        return Response(result.to_dict())


def _document_out(doc: Any) -> dict[str, Any]:
    return {"id": str(doc.id), "title": doc.title, "body": doc.body, "metadata": doc.metadata, "created_at": doc.created_at.isoformat()}


class DocumentListCreateApi(AcyclicAPIView):
    @extend_schema(responses={200: s.DocumentOut(many=True), 401: s.ErrorOut}, operation_id="documents_list")
    def get(self, request: Request) -> Response:
        try:
            limit = min(max(int(request.query_params.get("limit", 50)), 1), 500)
            offset = max(int(request.query_params.get("offset", 0)), 0)
        except ValueError as exc:
            raise InvalidRequest("limit and offset must be integers") from exc
        docs = selectors.document_list_for_tenant(tenant_id=tenant_of(request).tenant_id, limit=limit, offset=offset)
        return Response([_document_out(d) for d in docs])

    @extend_schema(request=s.DocumentInput, responses={201: s.DocumentOut, 400: s.ErrorOut, 401: s.ErrorOut}, operation_id="documents_create")
    def post(self, request: Request) -> Response:
        data = s.validated(s.DocumentInput, request.data)
        doc = services.document_create(tenant=tenant_of(request).tenant, title=data["title"], body=data["body"], metadata=data.get("metadata"))
        return Response(_document_out(doc), status=201)


class DocumentDetailApi(AcyclicAPIView):
    @extend_schema(responses={200: s.DocumentOut, 401: s.ErrorOut, 404: s.ErrorOut}, operation_id="documents_get")
    def get(self, request: Request, document_id: str) -> Response:
        doc = selectors.document_get_for_tenant(tenant_id=tenant_of(request).tenant_id, document_id=document_id)
        return Response(_document_out(doc))

    @extend_schema(responses={204: None, 401: s.ErrorOut, 404: s.ErrorOut}, operation_id="documents_delete")
    def delete(self, request: Request, document_id: str) -> Response:
        services.document_delete(tenant_id=tenant_of(request).tenant_id, document_id=document_id)
        return Response(status=204)
