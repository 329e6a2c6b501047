"""DRF serializers: the batch and document endpoints' input, and the bodies the
OpenAPI schema describes. Field errors become specific error codes in
``pipeline.api.errors``. (The real-time endpoints validate with pydantic:
``pipeline.api.inputs``.)

DRF's CharField already refuses NUL characters and lone surrogates, which
Postgres and Redis could not store."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from pipeline.api.errors import validation_error
from pipeline.config import get_config
from pipeline.tokenbus import RequestStatus


class RequestOptions(serializers.Serializer):
    """What shapes an answer besides the prompt: for one request, or for every prompt of a batch."""

    worker = serializers.CharField(required=False, max_length=100)
    model = serializers.CharField(required=False, max_length=200)
    max_tokens = serializers.IntegerField(required=False, min_value=1)
    temperature = serializers.FloatField(required=False, min_value=0.0, max_value=2.0, allow_null=True)
    stop = serializers.ListField(child=serializers.CharField(max_length=64, trim_whitespace=False), required=False, max_length=16)
    metadata = serializers.DictField(required=False)

    def validate_max_tokens(self, value: int) -> int:
        limit = get_config().limits.max_tokens_limit  # the configured limit, the same words as the other endpoints
        if value > limit:
            raise serializers.ValidationError(f"may be at most {limit} (limits.max_tokens_limit)", code="max_value")
        return value

    def validate_stop(self, value: list[str]) -> list[str]:
        limit = get_config().limits.max_stop_sequences
        if len(value) > limit:
            raise serializers.ValidationError(f"at most {limit} stop sequences", code="max_length")
        return value

    def validate_metadata(self, value: dict[str, Any]) -> dict[str, Any]:
        if len(repr(value)) > 4096:
            raise serializers.ValidationError("metadata is larger than 4 KiB", code="max_length")
        return value


def validated(serializer_cls: type[serializers.Serializer], data: Any) -> dict[str, Any]:
    """``data`` validated by ``serializer_cls``, or ``InvalidRequest`` (and its kin)
    naming the fields."""
    serializer = serializer_cls(data=data)
    if not serializer.is_valid():
        raise validation_error(serializer.errors)
    return dict(serializer.validated_data)


class InferQueued(serializers.Serializer):
    request_id = serializers.CharField()
    status = serializers.CharField()


class UsageOut(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class TimingsOut(serializers.Serializer):
    rag = serializers.IntegerField()
    assemble = serializers.IntegerField()
    inference = serializers.IntegerField()
    post = serializers.IntegerField()
    stream = serializers.IntegerField()


class InferResult(serializers.Serializer):
    request_id = serializers.CharField()
    session_id = serializers.CharField()
    status = serializers.CharField()
    text = serializers.CharField()
    worker = serializers.CharField()
    model = serializers.CharField()
    finish_reason = serializers.CharField()
    usage = UsageOut()
    timings_us = TimingsOut()
    sources = serializers.ListField(child=serializers.DictField(), help_text="the documents the answer used: id, title, rank, score")
    tool_calls = serializers.ListField(child=serializers.DictField(), help_text="OpenAI's shape; [] on this endpoint, which takes no tools")
    logprobs = serializers.ListField(child=serializers.DictField(), allow_null=True)


class RequestStatusOut(serializers.Serializer):
    request_id = serializers.CharField()
    session_id = serializers.CharField()
    status = serializers.ChoiceField(choices=[status.value for status in RequestStatus])
    created_at = serializers.DateTimeField(allow_null=True)
    updated_at = serializers.DateTimeField(allow_null=True)


class DocumentInput(serializers.Serializer):
    title = serializers.CharField(max_length=300)
    body = serializers.CharField(max_length=1_000_000)
    metadata = serializers.DictField(required=False)


class DocumentOut(serializers.Serializer):
    id = serializers.UUIDField()
    title = serializers.CharField()
    body = serializers.CharField()
    metadata = serializers.DictField()
    created_at = serializers.DateTimeField()


class ErrorBody(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()
    data = serializers.DictField()  # type: ignore[assignment]  # the wire name; DRF pops declared fields, so Serializer.data is intact


class ErrorOut(serializers.Serializer):
    error = ErrorBody()


class BudgetOut(serializers.Serializer):
    id = serializers.IntegerField()
    scope = serializers.ChoiceField(choices=["tenant", "key", "session"])
    api_key_prefix = serializers.CharField(allow_null=True)
    session_id = serializers.CharField(allow_null=True)
    period = serializers.ChoiceField(choices=["day", "month", "total"])
    amount_usd = serializers.DecimalField(max_digits=14, decimal_places=6, coerce_to_string=True)
    spent_usd = serializers.CharField()
    reserved_usd = serializers.CharField(help_text="Held by requests in flight, for their worst case.")
    remaining_usd = serializers.CharField()
    resets_at = serializers.DateTimeField(allow_null=True)


class BudgetsOut(serializers.Serializer):
    budgets = BudgetOut(many=True)


class UsageRowOut(serializers.Serializer):
    day = serializers.DateField()
    worker = serializers.CharField()
    model = serializers.CharField()
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    cost_usd = serializers.CharField()


class UsageReportOut(serializers.Serializer):
    since = serializers.DateField()
    until = serializers.DateField()
    usage = UsageRowOut(many=True)
