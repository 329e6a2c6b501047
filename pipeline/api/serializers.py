"""Input validation for the HTTP API. Field errors become specific error codes in
``pipeline.api.errors``; everything else about a request is checked in services.

DRF's CharField already refuses NUL characters and lone surrogates, which
Postgres and Redis could not store."""

from __future__ import annotations

import copy
import re
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


class ShallowFields:
    """A serializer whose fields are shallow copies of its declared ones.

    DRF deep-copies every declared field for each serializer instance, re-running
    each field's ``__init__`` (~120 us for ``InferInput``: the largest piece of
    Python work on the gateway's path for a streamed prompt, ~8 % of its time under
    SSE load). The declared fields are templates that DRF never binds, so a shallow
    copy is a field of its own to bind (name, parent, label, source), sharing only
    what validation reads: its arguments, error messages, validators and, for a
    list or dict field, its child. So a subclass must not mutate those in place
    (``self.fields[name].validators.append(...)``), and must have no nested
    serializer fields (their bound fields would be shared)."""

    _declared_fields: dict[str, serializers.Field]

    def get_fields(self) -> dict[str, serializers.Field]:
        return {name: copy.copy(field) for name, field in self._declared_fields.items()}


class InferInput(ShallowFields, RequestOptions):
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
    """``data`` validated by a new ``serializer_cls``, or ``InvalidRequest`` (and its
    kin) naming the fields. The serializer is unbound afterwards (``unbind``): it
    leaves no garbage for the cycle collector."""
    serializer = serializer_cls(data=data)
    try:
        if not serializer.is_valid():
            raise validation_error(serializer.errors)
        return dict(serializer.validated_data)
    finally:
        unbind(serializer)


def unbind(field: serializers.Field) -> None:
    """Break the reference cycles that binding made in a used serializer.

    A bound serializer and its fields point at each other (``fields`` and each
    field's ``parent``), as do a list field and its child. So every validation left
    ~40 objects (``InferInput``) to ~120 (``ChatCompletionInput``) that only the
    cycle collector could free. On the gateway that garbage decided when the
    collector ran and how long it stopped the event loop: 5-16 ms pauses, every few
    seconds at concurrency 1 (BENCHMARKS.md). Unbound, a serializer is freed by
    reference counting when its caller lets go of it. Only what this serializer
    bound is touched: a child shared with a declared field (``ShallowFields``)
    keeps its parent. The serializer is not to be used afterwards."""
    bound = field.__dict__.pop("fields", None)  # a serializer's fields (a cached property)
    children = list(bound.values()) if bound is not None else []
    child = field.__dict__.get("child")  # a list or dict field's, or a ListSerializer's
    if child is not None:
        children.append(child)
    for each in children:
        if each.__dict__.get("parent") is field:
            unbind(each)
            each.parent = None


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
