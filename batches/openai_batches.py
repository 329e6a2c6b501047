"""OpenAI's Batch API on top of batch jobs: ``/v1/files`` and ``/v1/batches``.

An upload (purpose ``batch``) is kept as it came. ``POST /v1/batches`` reads it: each
line is a ``/v1/chat/completions`` request (``custom_id``, ``method``, ``url``,
``body``) and becomes an item that keeps its own body, so each runs with its own
messages and parameters. The file has one model, as OpenAI requires: the first
request's. A line that cannot run (not JSON, a repeated ``custom_id``, another
model, a body the endpoint would refuse) is an item failed at once, reported on
its own line of the error file with its line number, not a refused upload.

When the job has ended (completed, expired or cancelled) and no item is being run
any more, the batch is finalized: its output and error files are written from the
items, in OpenAI's line format, by a batch worker (the delivery task, which the
sweep also queues). Until then the batch is ``finalizing`` or ``cancelling``.
The files are not copies: their lines are made from the items whenever they are
read, and ``bytes`` is counted when the batch is finalized.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import structlog
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from batches import services
from batches.models import BatchFile, BatchItem, BatchJob, OpenAIBatch
from orchestrator_site.errors import FileTooLarge, InvalidRequest, NotFound, OrchestratorError
from pipeline.api.errors import openai_body
from pipeline.api.openai_compat import completion_body, resolve_model
from pipeline.config import PipelineSettings
from pipeline.models import Tenant
from pipeline.types import ChatMessage, ToolCall

log = structlog.get_logger("batches")

ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"  # the only one OpenAI offers
WINDOW = dt.timedelta(hours=24)
PAGE = 1000  # items read per query while writing a file
CHUNK = 1 << 20  # an upload's bytes sent at a time
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512
MAX_REPORTED = 10  # bad requests named in one error, at most


# ---- files ----------------------------------------------------------------------


def upload(*, tenant: Tenant, purpose: object, filename: str, content: bytes, config: PipelineSettings) -> BatchFile:
    """An uploaded file, kept as it came; only ``batch`` files are taken here."""
    if purpose != BatchFile.Purpose.BATCH:
        raise InvalidRequest(f"purpose must be 'batch', not {purpose!r}: only batch input files are served here", data={"field": "purpose"})
    refuse_larger_than_allowed(len(content), config)
    if not content.strip():
        raise InvalidRequest("the file is empty", data={"field": "file"})
    name = (filename or "upload.jsonl").replace("\x00", "")[-255:]
    file = BatchFile.objects.create(tenant=tenant, purpose=BatchFile.Purpose.BATCH, filename=name, bytes=len(content), content=content)
    log.info("batch_file_uploaded", file_id=file.id, tenant_id=str(tenant.id), bytes=file.bytes, outcome="ok")
    return file


def files(tenant_id: str) -> QuerySet[BatchFile]:
    """The tenant's files: uploads, and the output files of batches that still exist
    (one whose batch was deleted with its job is gone too)."""
    kept = Q(content__isnull=False) | Q(output_of__isnull=False) | Q(errors_of__isnull=False)
    return BatchFile.objects.filter(kept, tenant_id=tenant_id)


def refuse_larger_than_allowed(size: int, config: PipelineSettings) -> None:
    """``FileTooLarge`` for an upload of ``size`` bytes over ``batch.max_body_mb``."""
    limit = config.batch.max_body_mb * 1024 * 1024
    if size > limit:
        raise FileTooLarge(f"the file is larger than {config.batch.max_body_mb} MB (batch.max_body_mb)", data={"field": "file", "limit_bytes": limit})


def unfinalize(job: BatchJob) -> None:
    """The job runs again (its failed items retried): its batch's files are gone, to be
    made anew when it ends."""
    for batch in OpenAIBatch.objects.select_related("output_file", "error_file").filter(job=job):
        stale = [file for file in (batch.output_file, batch.error_file) if file is not None]
        OpenAIBatch.objects.filter(pk=batch.pk).update(finalized_at=None, output_file=None, error_file=None)
        for file in stale:
            file.delete()


def file_of(*, tenant_id: str, file_id: str) -> BatchFile:
    file = files(tenant_id).filter(pk=file_id).first()
    if file is None:
        raise NotFound(f"no file {file_id!r}", data={"field": "file_id", "file_id": file_id})
    return file


def file_object(file: BatchFile) -> dict[str, Any]:
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": int(file.created_at.timestamp()),
        "expires_at": None,
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "status_details": None,
    }


def file_delete(*, tenant_id: str, file_id: str) -> dict[str, Any]:
    """A file gone; a batch made from it keeps its items (each has its own body)."""
    file = file_of(tenant_id=tenant_id, file_id=file_id)
    OpenAIBatch.objects.filter(input_file=file).update(input_file=None)
    file.delete()
    return {"id": file_id, "object": "file", "deleted": True}


def file_chunks(file: BatchFile) -> Iterator[bytes]:
    """The file's bytes, a part at a time: an upload's as stored, an output file's made
    from its batch's items."""
    if file.content is not None:
        content = bytes(file.content)
        for start in range(0, len(content), CHUNK):
            yield content[start : start + CHUNK]
        return
    batch = OpenAIBatch.objects.select_related("job").filter(Q(output_file=file) | Q(error_file=file)).first()
    if batch is None:  # its batch was deleted with its job since it was found
        return
    lines = _output_lines if batch.output_file_id == file.id else _error_lines
    for page in lines(batch):
        yield services.ndjson(page)


# ---- batches --------------------------------------------------------------------


def batch_create(*, tenant: Tenant, data: Mapping[str, Any], config: PipelineSettings) -> OpenAIBatch:
    """A batch of the requests in an uploaded file (validated: ``BatchCreateInput``)."""
    if data["endpoint"] != ENDPOINT:
        raise InvalidRequest(f"endpoint must be {ENDPOINT!r}: the only one batches run here", data={"field": "endpoint"})
    if data["completion_window"] != COMPLETION_WINDOW:
        raise InvalidRequest(f"completion_window must be {COMPLETION_WINDOW!r}", data={"field": "completion_window"})
    metadata = _metadata(data.get("metadata"))
    source = file_of(tenant_id=str(tenant.id), file_id=str(data["input_file_id"]))
    if source.purpose != BatchFile.Purpose.BATCH or source.content is None:
        raise InvalidRequest(f"file {source.id!r} is not a batch input file (purpose {source.purpose!r})", data={"field": "input_file_id"})
    lines = _lines(bytes(source.content), config)
    numbers = [number for number, _ in lines]  # the file's line numbers, blank lines counted
    parsed = [_parsed(line) for _, line in lines]
    worker, model, prompts = requests_as_prompts(parsed, numbers=numbers, field="input_file_id", tenant_id=str(tenant.id), config=config)
    made: list[OpenAIBatch] = []

    def attach(job: BatchJob) -> None:
        made.append(OpenAIBatch.objects.create(job=job, input_file=source, endpoint=ENDPOINT, completion_window=COMPLETION_WINDOW))

    services.batch_create(
        tenant=tenant,
        # Low priority, as OpenAI's batches are served: behind real-time work and the native
        # API's default jobs, until the window's end is near (batch.deadline_near_s).
        data={
            "prompts": prompts,
            "worker": worker,
            "model": model,
            "metadata": metadata,
            "deadline": timezone.now() + WINDOW,
            "priority": BatchJob.Priority.LOW,
        },
        config=config,
        before_start=attach,
    )
    batch = made[0]
    log.info("openai_batch_created", batch_id=batch.id, job_id=str(batch.job_id), file_id=source.id, items=len(prompts), outcome="ok")
    return batch


def _metadata(raw: object) -> dict[str, str]:
    if raw is None:
        return {}
    if (
        not isinstance(raw, dict)
        or len(raw) > METADATA_PAIRS
        or not all(isinstance(k, str) and len(k) <= METADATA_KEY and isinstance(v, str) and len(v) <= METADATA_VALUE for k, v in raw.items())
    ):
        raise InvalidRequest(
            f"metadata must map at most {METADATA_PAIRS} keys of up to {METADATA_KEY} characters to strings of up to {METADATA_VALUE}",
            data={"field": "metadata"},
        )
    return dict(raw)


def _lines(content: bytes, config: PipelineSettings) -> list[tuple[int, str]]:
    """The file's non-blank lines with their numbers (from 1)."""
    try:
        text = content.decode("utf-8-sig")  # a byte order mark, as Windows editors write it, is not part of the first line
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the input file is not UTF-8 text (byte {exc.start})", data={"field": "input_file_id"}) from exc
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise InvalidRequest("the input file has no requests", data={"field": "input_file_id"})
    if len(lines) > config.batch.max_items:
        raise InvalidRequest(f"the input file has {len(lines)} requests; at most {config.batch.max_items} (batch.max_items)", data={"field": "input_file_id"})
    return lines


def _model_named(requests: Iterable[object], field: str) -> str:
    """The first request's model: the batch's."""
    for parsed in requests:
        body = parsed.get("body") if isinstance(parsed, dict) else None
        if isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"]:
            return str(body["model"])
    raise InvalidRequest("no request names a model (body.model)", data={"field": field})


def _parsed(line: str) -> object:
    """The line's JSON value, or the error saying where it stops being JSON."""
    try:
        return json.loads(line)
    except ValueError as exc:  # json's JSONDecodeError
        return InvalidRequest(f"the line is not valid JSON: {exc}")


def request_prompt(number: int, parsed: object, *, name: str, tenant_id: str, worker: str, model: str, config: PipelineSettings) -> services.Prompt:
    """A batch request (a line's JSON value) as an item to run on ``worker`` and
    ``model`` (the batch's model, ``name`` as the requests give it), or as one refused
    with what is wrong with it."""
    found = parsed.get("custom_id") if isinstance(parsed, dict) else None
    custom_id = found if isinstance(found, str) else ""
    try:
        if isinstance(parsed, OrchestratorError):
            raise parsed
        if not isinstance(parsed, dict):
            raise InvalidRequest("the line is not a JSON object")
        _check_line(parsed, name)
        body = dict(parsed["body"])
        request = services.body_request(body, tenant_id=tenant_id, worker=worker, model=model, config=config)
    except OrchestratorError as exc:
        return _refused(number, custom_id, exc)
    return services.Prompt(request.prompt, custom_id, request=body)


def requests_as_prompts(
    requests: Sequence[object], *, numbers: Sequence[int], field: str, tenant_id: str, config: PipelineSettings
) -> tuple[str, str, list[services.Prompt]]:
    """Batch requests as a job's worker, model and items; a request that cannot run is
    an item refused with its error and its line (``numbers``)."""
    name = _model_named(requests, field)
    worker, model = resolve_model(config, name)
    prompts = [
        request_prompt(n, parsed, name=name, tenant_id=tenant_id, worker=worker, model=model, config=config)
        for n, parsed in zip(numbers, requests, strict=True)
    ]
    _refuse_repeats(prompts, numbers)
    return worker, model, prompts


def _check_line(parsed: dict[str, Any], name: str) -> None:
    custom_id = parsed.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 64 or "\x00" in custom_id:
        raise InvalidRequest("custom_id must be a string of 1 to 64 characters", data={"field": "custom_id"})
    if parsed.get("method") != "POST":
        raise InvalidRequest("method must be 'POST'", data={"field": "method"})
    if parsed.get("url") != ENDPOINT:
        raise InvalidRequest(f"url must be {ENDPOINT!r}, the batch's endpoint", data={"field": "url"})
    body = parsed.get("body")
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object", data={"field": "body"})
    if body.get("model") != name:
        raise InvalidRequest(f"the model must be the file's, {name!r}: a batch has one model", data={"field": "body.model"})


def native_requests(requests: Sequence[object], *, tenant_id: str, config: PipelineSettings) -> tuple[str, str, list[services.Prompt]]:
    """``POST /api/v1/batch``'s ``requests``: as its ``prompts`` are, all of them valid or
    the job refused, naming the first bad ones (``item N``, from 0)."""
    worker, model, prompts = requests_as_prompts(requests, numbers=range(len(requests)), field="requests", tenant_id=tenant_id, config=config)
    problems = [f"item {p.error.data.pop('line')}: {p.error.message}" for p in prompts if p.error is not None]
    if problems:
        shown = problems[:MAX_REPORTED] + ([f"and {len(problems) - MAX_REPORTED} more"] if len(problems) > MAX_REPORTED else [])
        raise InvalidRequest("some fields are invalid: requests", data={"fields": {"requests": shown}})
    return worker, model, prompts


def _refused(number: int, custom_id: str, error: OrchestratorError) -> services.Prompt:
    error.data["line"] = number
    return services.Prompt("", custom_id if len(custom_id) <= 64 else "", refused=error)


def _refuse_repeats(prompts: list[services.Prompt], numbers: Sequence[int]) -> None:
    """A ``custom_id`` used before in the batch: the later requests are refused."""
    seen: set[str] = set()
    for place, prompt in enumerate(prompts):
        if prompt.error is None and prompt.custom_id in seen:
            error = InvalidRequest(f"custom_id {prompt.custom_id!r} is used by an earlier line", data={"field": "custom_id"})
            prompts[place] = _refused(numbers[place], prompt.custom_id, error)
        seen.add(prompt.custom_id)


def batch_of(*, tenant_id: str, batch_id: str) -> OpenAIBatch:
    batch = OpenAIBatch.objects.select_related("job").filter(pk=batch_id, job__tenant_id=tenant_id).first()
    if batch is None:
        raise NotFound(f"no batch {batch_id!r}", data={"field": "batch_id", "batch_id": batch_id})
    return batch


def batch_cancel(*, tenant_id: str, batch_id: str) -> OpenAIBatch:
    batch = batch_of(tenant_id=tenant_id, batch_id=batch_id)
    services.batch_cancel(tenant_id=tenant_id, job_id=batch.job_id)
    return batch_of(tenant_id=tenant_id, batch_id=batch_id)


def _epoch(moment: dt.datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def status_of(batch: OpenAIBatch) -> str:
    job = batch.job
    if job.status in BatchJob.ACTIVE:
        return "in_progress"
    if job.status == BatchJob.Status.CANCELLED:
        return "cancelled" if batch.finalized_at else "cancelling"
    if batch.finalized_at is None:
        return "finalizing"
    return "expired" if job.items_expired else "completed"


def batch_object(batch: OpenAIBatch) -> dict[str, Any]:
    """The batch as OpenAI shows it."""
    job = batch.job
    status = status_of(batch)
    ended = batch.finalized_at
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": None,
        "input_file_id": batch.input_file_id or "",
        "completion_window": batch.completion_window,
        "status": status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": int(job.created_at.timestamp()),
        "in_progress_at": _epoch(job.started_at or job.created_at),
        "expires_at": _epoch(job.deadline),
        "finalizing_at": _epoch(job.finished_at) if job.status == BatchJob.Status.COMPLETED else None,
        "completed_at": _epoch(ended) if status == "completed" else None,
        "failed_at": None,
        "expired_at": _epoch(ended) if status == "expired" else None,
        "cancelling_at": _epoch(job.finished_at) if job.status == BatchJob.Status.CANCELLED else None,
        "cancelled_at": _epoch(ended) if status == "cancelled" else None,
        "request_counts": {"total": job.items_total, "completed": job.items_done, "failed": job.items_failed + job.items_expired},
        "metadata": job.metadata or None,
        "model": f"{job.worker}/{job.model}",
    }


# ---- finalizing -----------------------------------------------------------------


def due() -> list[str]:
    """The ids of ended jobs whose batch has no output files yet."""
    ended = (BatchJob.Status.COMPLETED, BatchJob.Status.CANCELLED)
    return [str(job_id) for job_id in OpenAIBatch.objects.filter(finalized_at__isnull=True, job__status__in=ended).values_list("job_id", flat=True)]


def finalize(job: BatchJob, *, now: dt.datetime | None = None) -> bool:
    """The batch's output and error files, once its job has ended and none of its items
    is being run (a cancelled job's last runs are recorded first). True when they are
    written (now or before); False when it is not time yet, or the job has no batch."""
    now = now or timezone.now()
    running = BatchItem.objects.filter(job_id=job.pk, status=BatchItem.Status.PENDING, leased_until__gt=now)
    if job.status in BatchJob.ACTIVE or running.exists():
        return False
    with transaction.atomic():
        batch = OpenAIBatch.objects.select_for_update().select_related("job").filter(job_id=job.pk).first()
        if batch is None:
            return False
        if batch.finalized_at is not None:
            return True
        for role, lines in (("output", _output_lines), ("error", _error_lines)):
            size = sum(len(services.ndjson(page)) for page in lines(batch))  # what file_chunks will send
            if size:
                file = BatchFile.objects.create(
                    tenant_id=job.tenant_id, purpose=BatchFile.Purpose.BATCH_OUTPUT, filename=f"{batch.id}_{role}.jsonl", bytes=size
                )
                setattr(batch, f"{role}_file", file)
        batch.finalized_at = timezone.now()
        batch.save(update_fields=["output_file", "error_file", "finalized_at"])
    log.info("openai_batch_finalized", batch_id=batch.id, job_id=str(job.pk), outcome="ok")
    return True


def _pages(batch: OpenAIBatch, statuses: tuple[str, ...]) -> Iterator[list[BatchItem]]:
    after = -1
    while True:
        page = list(BatchItem.objects.filter(job_id=batch.job_id, index__gt=after, status__in=statuses).order_by("index")[:PAGE])
        if not page:
            return
        yield page
        after = page[-1].index


def _output_lines(batch: OpenAIBatch) -> Iterator[list[dict[str, Any]]]:
    """The answered requests, in the input file's order."""
    job = batch.job
    for page in _pages(batch, (BatchItem.Status.DONE,)):
        yield [_answer_line(job, item) for item in page]


def _error_lines(batch: OpenAIBatch) -> Iterator[list[dict[str, Any]]]:
    """The requests that failed, expired, or were not run before the batch was cancelled."""
    statuses: tuple[str, ...] = (BatchItem.Status.FAILED, BatchItem.Status.EXPIRED)
    if batch.job.status == BatchJob.Status.CANCELLED:
        statuses += (BatchItem.Status.PENDING,)
    for page in _pages(batch, statuses):
        yield [_error_line(batch.job, item) for item in page]


def _request_id(job: BatchJob, item: BatchItem) -> str:
    return f"{job.id.hex}-{item.index}"


def _answer_line(job: BatchJob, item: BatchItem) -> dict[str, Any]:
    detail = item.detail or {}
    calls = tuple(ToolCall.from_dict(call) for call in detail.get("tool_calls") or ())
    body = completion_body(
        request_id=_request_id(job, item),
        model=f"{job.worker}/{job.model}",
        created=int((item.finished_at or job.created_at).timestamp()),
        message=ChatMessage("assistant", item.output, tool_calls=calls),
        logprobs=detail.get("logprobs"),
        finish_reason=item.finish_reason,
        usage=item.usage,
        sources=[],
    )
    return {
        "id": f"batch_req_{item.pk}",
        "custom_id": item.custom_id,
        "response": {"status_code": 200, "request_id": _request_id(job, item), "body": body},
        "error": None,
    }


def _error_line(job: BatchJob, item: BatchItem) -> dict[str, Any]:
    line: dict[str, Any] = {"id": f"batch_req_{item.pk}", "custom_id": item.custom_id or None, "response": None, "error": None}
    if item.status == BatchItem.Status.PENDING:  # the batch was cancelled first
        line["error"] = {"code": "batch_cancelled", "message": "the batch was cancelled before this request ran"}
        return line
    error = OrchestratorError.from_dict(item.error or {})
    if item.status == BatchItem.Status.EXPIRED:
        line["error"] = {"code": "batch_expired", "message": "this request could not be run before the batch's completion window ended"}
        return line
    body = openai_body(error)
    if "line" in error.data:
        body["error"]["line"] = error.data["line"]
    line["response"] = {"status_code": error.http_status, "request_id": _request_id(job, item), "body": body}
    return line
