"""OpenAI's Files and Batch APIs (``batches.openai_batches``): each view validates,
calls one service, renders. Errors are OpenAI's shape, as everywhere under ``/v1/``."""

from __future__ import annotations

from typing import Any

from django.db.models import F
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from batches import openai_batches
from batches.api.views import BatchJSONParser, streamed
from batches.models import OpenAIBatch
from orchestrator_site.errors import InvalidRequest
from pipeline.api.serializers import validated
from pipeline.api.views import tenant_of
from pipeline.config import get_config

FORM_ROOM = 64 * 1024  # a multipart body's room besides the file: boundaries, headers, purpose


class FileUploadInput(serializers.Serializer):
    file = serializers.FileField(allow_empty_file=True)
    purpose = serializers.CharField()


class BatchCreateInput(serializers.Serializer):
    input_file_id = serializers.CharField(max_length=64)
    endpoint = serializers.CharField(max_length=200)
    completion_window = serializers.CharField(max_length=16)
    metadata = serializers.JSONField(required=False, allow_null=True, default=None)


def _list(request: Request, rows: Any, render: Any, *, default: int, high: int) -> dict[str, Any]:
    """OpenAI's cursor page: ``limit`` objects after the one named ``after``, newest first."""
    raw = request.query_params.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= high:
        raise InvalidRequest(f"limit must be an integer from 1 to {high}", data={"field": "limit"})
    after = request.query_params.get("after")
    if after:
        anchor = rows.filter(pk=after).values_list("created_at", flat=True).first()
        if anchor is None:
            raise InvalidRequest(f"after names no object of this list: {after!r}", data={"field": "after"})
        rows = rows.filter(created_at__lt=anchor)
    page = list(rows[: int(raw) + 1])
    data = [render(row) for row in page[: int(raw)]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(page) > int(raw),
    }


class FilesApi(APIView):
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(request={"multipart/form-data": FileUploadInput}, responses={200: dict}, operation_id="openai_files_create")
    def post(self, request: Request) -> Response:
        principal = tenant_of(request)
        config = get_config()
        length = request.META.get("CONTENT_LENGTH") or ""
        if length.isdigit():  # refused before the body is read
            openai_batches.refuse_larger_than_allowed(int(length) - FORM_ROOM, config)
        data = validated(FileUploadInput, request.data)
        upload = data["file"]
        file = openai_batches.upload(tenant=principal.tenant, purpose=data["purpose"], filename=upload.name or "", content=upload.read(), config=config)
        return Response(openai_batches.file_object(file))

    @extend_schema(
        parameters=[OpenApiParameter("purpose", str), OpenApiParameter("limit", int), OpenApiParameter("after", str)],
        responses={200: dict},
        operation_id="openai_files_list",
    )
    def get(self, request: Request) -> Response:
        rows = openai_batches.files(tenant_of(request).tenant_id).defer("content").order_by("-created_at", "-id")
        purpose = request.query_params.get("purpose")
        if purpose:
            rows = rows.filter(purpose=purpose)
        return Response(_list(request, rows, openai_batches.file_object, default=10_000, high=10_000))


class FileDetailApi(APIView):
    @extend_schema(responses={200: dict}, operation_id="openai_files_get")
    def get(self, request: Request, file_id: str) -> Response:
        return Response(openai_batches.file_object(openai_batches.file_of(tenant_id=tenant_of(request).tenant_id, file_id=file_id)))

    @extend_schema(responses={200: dict}, operation_id="openai_files_delete")
    def delete(self, request: Request, file_id: str) -> Response:
        return Response(openai_batches.file_delete(tenant_id=tenant_of(request).tenant_id, file_id=file_id))


class ContentRenderer(JSONRenderer):
    """A file's content is sent as it is, whatever the client accepts (the SDK asks for
    ``application/binary``); an error before it is the JSON error body."""

    media_type = "*/*"
    format = "bin"


class FileContentApi(APIView):
    renderer_classes = [JSONRenderer, ContentRenderer]

    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY}, operation_id="openai_files_content")
    def get(self, request: Request, file_id: str) -> StreamingHttpResponse:
        file = openai_batches.file_of(tenant_id=tenant_of(request).tenant_id, file_id=file_id)
        response = StreamingHttpResponse(streamed(openai_batches.file_chunks(file)), content_type="application/octet-stream")
        response["Content-Length"] = str(file.bytes)
        response["Content-Disposition"] = f'attachment; filename="{file.filename}"'
        return response


class BatchesApi(APIView):
    parser_classes = [BatchJSONParser]

    @extend_schema(request=BatchCreateInput, responses={200: dict}, operation_id="openai_batches_create")
    def post(self, request: Request) -> Response:
        principal = tenant_of(request)
        data = validated(BatchCreateInput, request.data)
        batch = openai_batches.batch_create(tenant=principal.tenant, data=data, config=get_config())
        return Response(openai_batches.batch_object(batch))

    @extend_schema(parameters=[OpenApiParameter("limit", int), OpenApiParameter("after", str)], responses={200: dict}, operation_id="openai_batches_list")
    def get(self, request: Request) -> Response:
        rows = OpenAIBatch.objects.select_related("job").filter(job__tenant_id=tenant_of(request).tenant_id).annotate(created_at=F("job__created_at"))
        return Response(_list(request, rows.order_by("-created_at", "-id"), openai_batches.batch_object, default=20, high=100))


class BatchDetailApi(APIView):
    @extend_schema(responses={200: dict}, operation_id="openai_batches_get")
    def get(self, request: Request, batch_id: str) -> Response:
        return Response(openai_batches.batch_object(openai_batches.batch_of(tenant_id=tenant_of(request).tenant_id, batch_id=batch_id)))


class BatchCancelApi(APIView):
    @extend_schema(request=None, responses={200: dict}, operation_id="openai_batches_cancel")
    def post(self, request: Request, batch_id: str) -> Response:
        return Response(openai_batches.batch_object(openai_batches.batch_cancel(tenant_id=tenant_of(request).tenant_id, batch_id=batch_id)))
