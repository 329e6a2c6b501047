"""Input validation for the HTTP API. Field errors become specific error codes in
``pipeline.api.errors``; everything else about a request is checked in services.

DRF's CharField already refuses NUL characters and lone surrogates, which
Postgres and Redis could not store."""

from __future__ import annotations

import re
import threading
from typing import Any

from rest_framework import serializers

from pipeline.api.errors import validation_error
from pipeline.config import get_config

SESSION_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")


class RequestOptions(serializers.Serializer):
    """What shapes an answer besides the prompt: for one request, or for every prompt of a batch."""

    worker = serializers.CharField(required=False, max_length=100)
    model = serializers.CharField(required=False, max_length=200)
    max_tokens = serializers.IntegerField(required=False, min_value=1, max_value=1_000_000)
    temperature = serializers.FloatField(required=False, min_value=0.0, max_value=2.0, allow_null=True)
    stop = serializers.ListField(child=serializers.CharField(max_length=64, trim_whitespace=False), required=False, max_length=16)
    metadata = serializers.DictField(required=False)

    def validate_stop(self, value: list[str]) -> list[str]:
        limit = get_config().limits.max_stop_sequences
        if len(value) > limit:
            raise serializers.ValidationError(f"at most {limit} stop sequences", code="max_length")
        return value

    def validate_metadata(self, value: dict[str, Any]) -> dict[str, Any]:
        if len(repr(value)) > 4096:
            raise serializers.ValidationError("metadata is larger than 4 KiB", code="max_length")
        return value


class InferInput(RequestOptions):
    prompt = serializers.CharField(trim_whitespace=False, allow_blank=True)
    session_id = serializers.CharField(required=False, max_length=128)
    wait = serializers.BooleanField(required=False, default=True)
    stream = serializers.BooleanField(required=False, default=False)

    def validate_prompt(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("prompt must not be empty", code="blank")
        limit = get_config().limits.max_prompt_chars
        if len(value) > limit:
            raise serializers.ValidationError(f"prompt is longer than {limit} characters", code="too_large")
        return value

    def validate_session_id(self, value: str) -> str:
        if not SESSION_ID.match(value):
            raise serializers.ValidationError("use 1-128 of A-Z a-z 0-9 _ . : @ -", code="invalid")
        return value


def validated(serializer_cls: type[serializers.Serializer], data: Any) -> dict[str, Any]:
    """``data`` validated by ``serializer_cls``, or ``InvalidRequest`` (and its kin)
    naming the fields.

    One serializer per class and thread validates every input (``_kept``), not a new
    one each time. DRF builds a serializer's fields per instance, deep copies of the
    declared ones with each field's ``__init__`` run again: 82 us for ``InferInput``
    and 207 for ``ChatCompletionInput`` where a kept one takes 26 and 33
    (BENCHMARKS.md), on the gateway's event loop, before every prompt starts. And a
    new one's fields and their parent point at each other: garbage for the cycle
    collector, whose pauses stop every stream of the gateway. Validation runs no
    I/O and never awaits, so one thread never validates two inputs at once on one
    instance; what an input leaves on it (the input, its result, its errors) is
    cleared before this returns."""
    serializer = _kept_serializer(serializer_cls)
    serializer.initial_data = data
    try:
        if not serializer.is_valid():
            raise validation_error(serializer.errors)
        return dict(serializer.validated_data)
    finally:
        for state in ("initial_data", "_validated_data", "_errors"):
            serializer.__dict__.pop(state, None)


class _Kept(threading.local):
    def __init__(self) -> None:
        self.serializers: dict[type[serializers.Serializer], serializers.Serializer] = {}


_kept = _Kept()


def _kept_serializer(serializer_cls: type[serializers.Serializer]) -> serializers.Serializer:
    serializer = _kept.serializers.get(serializer_cls)
    if serializer is None:
        serializer = _kept.serializers[serializer_cls] = serializer_cls()
    return serializer


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


class RequestStatusOut(serializers.Serializer):
    request_id = serializers.CharField()
    session_id = serializers.CharField()
    status = serializers.ChoiceField(choices=["queued", "running", "completed", "failed"])
    created_at = serializers.FloatField()
    updated_at = serializers.FloatField()


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
