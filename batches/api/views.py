"""The batch API: each view validates, calls one service, renders."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

from asgiref.sync import sync_to_async
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from batches import follow, openai_batches, services, webhooks
from batches.api import serializers as s
from batches.models import BatchJob
from orchestrator_site.errors import InvalidRequest
from pipeline.api.pagination import paginated
from pipeline.api.parsers import LimitedJSONParser
from pipeline.api.serializers import ErrorOut, validated
from pipeline.api.views import tenant_of
from pipeline.config import get_config

_ERRORS = {code: OpenApiResponse(ErrorOut) for code in (400, 401, 404, 413, 415)}


class BatchJSONParser(LimitedJSONParser):
    def limit(self) -> int:
        return get_config().batch.max_body_mb * 1024 * 1024


def _int_param(request: Request, name: str, default: int, *, low: int, high: int) -> int:
    try:
        return min(max(int(request.query_params.get(name, default)), low), high)
    except ValueError as exc:
        raise InvalidRequest(f"{name} must be an integer", data={"field": name}) from exc


def _bool_param(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise InvalidRequest(f"{name} must be true or false", data={"field": name})
    return raw in ("true", "1")


class BatchListCreateApi(APIView):
    parser_classes = [BatchJSONParser]

    @extend_schema(request=s.BatchInput, responses={201: s.BatchJobOut, **_ERRORS}, operation_id="batch_create")
    def post(self, request: Request) -> Response:
        principal = tenant_of(request)
        data = validated(s.BatchInput, request.data)
        config = get_config()
        if "requests" in data:  # OpenAI batch request lines: each item keeps its own body
            data["worker"], data["model"], data["prompts"] = openai_batches.native_requests(data.pop("requests"), tenant_id=principal.tenant_id, config=config)
        job = services.batch_create(tenant=principal.tenant, data=data, config=config)
        return Response(s.job_out(job), status=201, headers={"Location": f"/api/v1/batch/{job.id}"})

    @extend_schema(responses={200: s.BatchJobOut(many=True), 401: ErrorOut}, operation_id="batch_list")
    def get(self, request: Request) -> Response:
        jobs = BatchJob.objects.filter(tenant_id=tenant_of(request).tenant_id).prefetch_related("deliveries").order_by("-created_at", "-id")
        return paginated(request, jobs, s.job_out)


class BatchDetailApi(APIView):
    @extend_schema(responses={200: s.BatchJobOut, 401: ErrorOut, 404: ErrorOut}, operation_id="batch_get")
    def get(self, request: Request, job_id: uuid.UUID) -> Response:
        return Response(s.job_out(services.batch_get(tenant_id=tenant_of(request).tenant_id, job_id=job_id)))


class BatchCancelApi(APIView):
    @extend_schema(request=None, responses={200: s.BatchJobOut, 401: ErrorOut, 404: ErrorOut}, operation_id="batch_cancel")
    def post(self, request: Request, job_id: uuid.UUID) -> Response:
        return Response(s.job_out(services.batch_cancel(tenant_id=tenant_of(request).tenant_id, job_id=job_id)))


class BatchResultsApi(APIView):
    @extend_schema(
        parameters=[
            OpenApiParameter("after", int, description="only items with a higher index (to resume a download)"),
            OpenApiParameter("follow", bool, description="keep the response open and send each item as it finishes, until the job ends"),
        ],
        responses={(200, "application/x-ndjson"): OpenApiTypes.STR, 400: ErrorOut, 401: ErrorOut, 404: ErrorOut},
        operation_id="batch_results",
    )
    def get(self, request: Request, job_id: uuid.UUID) -> StreamingHttpResponse:
        job = services.batch_get(tenant_id=tenant_of(request).tenant_id, job_id=job_id)
        after = _int_param(request, "after", -1, low=-1, high=10**9)
        following = _bool_param(request, "follow")
        lines = follow.follow_ndjson(job, after) if following else results_stream(job, after)
        response = StreamingHttpResponse(lines, content_type="application/x-ndjson")
        if following:
            response["X-Accel-Buffering"] = "no"  # a proxy in front (nginx) passes each line on at once
        response["Cache-Control"] = "no-cache"
        return response


async def streamed(parts: Iterator[bytes]) -> AsyncIterator[bytes]:
    """``parts`` read one at a time in Django's sync thread (they query Postgres): under
    ASGI a sync iterator would be read whole into memory before the first byte."""
    step = sync_to_async(_next_part)
    while (part := await step(parts)) is not None:
        yield part


def _next_part(parts: Iterator[bytes]) -> bytes | None:
    return next(parts, None)


def results_stream(job: BatchJob, after: int = -1) -> AsyncIterator[bytes]:
    """The job's finished items as JSON lines, a page of Postgres rows at a time."""
    return streamed(services.ndjson(page) for page in services.result_pages(job, after=after))


class BatchWebhookSecretApi(APIView):
    @extend_schema(responses={200: OpenApiTypes.OBJECT, 401: ErrorOut}, operation_id="batch_webhook_secret")
    def get(self, request: Request) -> Response:
        """The secret the tenant's batch webhooks are signed with (Standard Webhooks)."""
        return Response({"secret": webhooks.secret_of(tenant_of(request).tenant_id)})
