"""Input and output of the batch API (``docs/api.md``, "Batch jobs")."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from batches import destinations
from batches.models import BatchJob
from batches.services import Prompt
from pipeline.api.serializers import RequestOptions
from pipeline.config import get_config

MAX_REPORTED = 10  # bad items named in one error, at most


def _prompt_problem(raw: object, seen: set[str]) -> tuple[Prompt | None, str]:
    """The item as a Prompt, or what is wrong with it."""
    text: object
    custom_id: object
    if isinstance(raw, str):
        text, custom_id = raw, ""
    elif isinstance(raw, dict) and set(raw) <= {"prompt", "custom_id"}:
        text, custom_id = raw.get("prompt"), raw.get("custom_id", "")
    else:
        return None, 'must be a string or {"prompt": ..., "custom_id": ...}'
    if not isinstance(text, str) or not text.strip():
        return None, "prompt must be a non-empty string"
    limit = get_config().limits.max_prompt_chars
    too_large = f"prompt is longer than {limit} characters" if len(text) > limit else ""
    if not isinstance(custom_id, str) or len(custom_id) > 64:
        return None, "custom_id must be a string of at most 64 characters"
    if "\x00" in custom_id or (not too_large and "\x00" in text):
        return None, "must not contain NUL characters"
    if custom_id and custom_id in seen:
        return None, f"custom_id {custom_id!r} is used twice"
    seen.add(custom_id)
    return Prompt("" if too_large else text, custom_id, too_large=too_large), ""


@extend_schema_field(
    {
        "type": "array",
        "minItems": 1,
        "items": {
            "oneOf": [
                {"type": "string"},
                {"type": "object", "properties": {"prompt": {"type": "string"}, "custom_id": {"type": "string", "maxLength": 64}}, "required": ["prompt"]},
            ]
        },
    }
)
class PromptsField(serializers.Field):
    """A list of prompts: strings, or objects with ``prompt`` and an optional ``custom_id``."""

    def to_internal_value(self, data: Any) -> list[Prompt]:
        if not isinstance(data, list) or not data:
            raise serializers.ValidationError("must be a non-empty list of prompts", code="invalid")
        limit = get_config().batch.max_items
        if len(data) > limit:
            raise serializers.ValidationError(f"at most {limit} prompts in one job", code="max_length")
        prompts: list[Prompt] = []
        problems: list[str] = []
        seen: set[str] = set()
        for index, raw in enumerate(data):
            prompt, problem = _prompt_problem(raw, seen)
            if prompt is None:
                problems.append(f"item {index}: {problem}")
            else:
                prompts.append(prompt)
        if problems:
            shown = problems[:MAX_REPORTED]
            if len(problems) > MAX_REPORTED:
                shown.append(f"and {len(problems) - MAX_REPORTED} more")
            raise serializers.ValidationError(shown, code="invalid")
        return prompts

    def to_representation(self, value: Any) -> Any:
        return value


class BatchInput(RequestOptions):
    """The prompts, and the options (worker, model, max_tokens, …) every one of them runs with."""

    prompts = PromptsField(required=False)
    requests = serializers.ListField(
        child=serializers.JSONField(),
        required=False,
        allow_empty=False,
        help_text="Instead of prompts: OpenAI batch request lines, each item with its own body (docs/api.md); the model is theirs.",
    )
    priority = serializers.ChoiceField(choices=BatchJob.Priority.values, required=False, default=BatchJob.Priority.DEFAULT)
    deadline = serializers.DateTimeField(
        required=False,
        allow_null=True,
        default=None,
        help_text="ISO 8601: the items not run by then end expired (batch_expired); earlier deadlines run first within a priority.",
    )

    destinations = serializers.JSONField(
        required=False,
        allow_null=True,
        default=None,
        help_text='Where the results go once the job completes: [{"kind": "file", "path": "out/name.jsonl"}] (docs/api.md).',
    )

    def validate_requests(self, value: list[Any]) -> list[Any]:
        limit = get_config().batch.max_items
        if len(value) > limit:
            raise serializers.ValidationError(f"at most {limit} requests in one job", code="max_length")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "prompts" not in attrs and "requests" not in attrs:
            raise serializers.ValidationError({"prompts": ["This field is required."]}, code="required")
        if "prompts" in attrs and "requests" in attrs:
            raise serializers.ValidationError({"requests": ["give prompts or requests, not both"]}, code="invalid")
        if "requests" in attrs and ({"worker", "model"} & set(attrs)):
            raise serializers.ValidationError({"model": ["the requests name their model (body.model)"]}, code="invalid")
        return attrs

    def validate_deadline(self, value: dt.datetime | None) -> dt.datetime | None:
        if value is not None and value <= timezone.now():
            raise serializers.ValidationError("the deadline has passed already; give a time in the future", code="invalid")
        return value


class BatchCountsOut(serializers.Serializer):
    total = serializers.IntegerField()
    done = serializers.IntegerField()
    failed = serializers.IntegerField()
    expired = serializers.IntegerField()
    pending = serializers.IntegerField()


class BatchJobOut(serializers.Serializer):
    id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=BatchJob.Status.values)
    priority = serializers.ChoiceField(choices=BatchJob.Priority.values)
    worker = serializers.CharField()
    model = serializers.CharField()
    counts = BatchCountsOut()
    progress = serializers.FloatField()
    deadline = serializers.DateTimeField(allow_null=True)
    destinations = serializers.ListField(child=serializers.DictField())
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)


def counts(job: BatchJob, settled: int) -> dict[str, int]:
    """The job's items by state; the ones a cancelled job never ran are ``cancelled``, not ``pending``."""
    left = job.items_total - settled
    base = {"total": job.items_total, "done": job.items_done, "failed": job.items_failed, "expired": job.items_expired}
    if job.status == BatchJob.Status.CANCELLED:
        return {**base, "pending": 0, "cancelled": left}
    return {**base, "pending": left, "cancelled": 0}


def job_out(job: BatchJob) -> dict[str, Any]:
    settled = job.items_settled
    return {
        "id": str(job.id),
        "status": job.status,
        "priority": job.priority,
        "worker": job.worker,
        "model": job.model,
        "counts": counts(job, settled),
        "progress": round(settled / job.items_total, 6) if job.items_total else 1.0,
        "deadline": job.deadline.isoformat() if job.deadline else None,
        "destinations": destinations.states(job),
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }
