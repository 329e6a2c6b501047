"""Batch jobs: submission, running their items, cancelling, recovery.

Postgres holds every item and its state; a Celery message on ``batch.<priority>``
names a range of a job's items ("chunk") for a batch worker to look at. A worker
claims one pending item at a time with a lease, runs it through the same five
stages as a real-time request (no token bus: nobody streams a batch item), and
records its answer or error. Whatever goes wrong with the messages (a killed
worker, a broker that was down, a duplicate) the items stay in Postgres, and the
scheduler's sweep (``batch_recover``) queues the chunks of a job that has stopped
moving again. Recording is idempotent: an item is answered once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import itertools
import json
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import structlog
from django.core.exceptions import ValidationError
from django.db import DatabaseError, connection, transaction
from django.db.models import F, Q
from django.db.models.functions import Greatest
from django.utils import timezone
from kombu.exceptions import OperationalError as KombuOperationalError

from batches import destinations, metrics, urgency
from batches.models import BatchItem, BatchJob
from orchestrator_site.errors import BatchExpired, CircuitOpen, NotFound, OrchestratorError, PromptTooLarge, ServiceUnavailable, TransientWorkerError
from pipeline import selectors
from pipeline.api.inputs import ChatCompletionInput, validated
from pipeline.config import PipelineSettings, config_at, config_version, get_config
from pipeline.engine import PipelineDeps, run_pipeline
from pipeline.metrics import record_stages
from pipeline.models import Tenant
from pipeline.queues import Queue
from pipeline.routing import route_request, worker_pool
from pipeline.services import budgets
from pipeline.services.gates import run_guarded
from pipeline.services.start import infer_build_request, max_tokens_for
from pipeline.types import PipelineResult, PromptRequest
from workers.types import AssembledPrompt

log = structlog.get_logger("batches")

# The provider may come back: the item stays pending and its chunk runs again later.
TRANSIENT = (TransientWorkerError, CircuitOpen, ServiceUnavailable)


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    custom_id: str = ""
    # Set when the prompt is over limits.max_prompt_chars: the item is stored failed with it,
    # and the rest of the job runs (its text is not kept).
    too_large: str = ""
    # An OpenAI batch line's request body (``batches.openai_batches``): the item runs with
    # its own messages and parameters, not the job's.
    request: Mapping[str, Any] | None = None
    # Set when the line was refused at submission: the item is stored failed with it.
    refused: OrchestratorError | None = None

    @property
    def error(self) -> OrchestratorError | None:
        return PromptTooLarge(self.too_large) if self.too_large else self.refused


def batch_create(*, tenant: Tenant, data: Mapping[str, Any], config: PipelineSettings, before_start: Callable[[BatchJob], None] | None = None) -> BatchJob:
    """Store the job and its items, then queue its chunks (after the commit: a worker
    must find what it is told about). Validated input: ``api.serializers.BatchInput``.
    ``before_start`` stores what belongs to the job in its transaction."""
    route = route_request(config, worker=data.get("worker"), model=data.get("model"))
    targets = destinations.validated(data.get("destinations"), config)
    prompts: Sequence[Prompt] = data["prompts"]
    refused = sum(1 for p in prompts if p.error)
    now = timezone.now()
    with transaction.atomic():
        job = BatchJob.objects.create(
            tenant=tenant,
            priority=data.get("priority") or BatchJob.Priority.DEFAULT,
            worker=route.worker,
            model=route.model,
            max_tokens=max_tokens_for(config, data.get("max_tokens")),
            temperature=data.get("temperature"),
            stop=list(data.get("stop") or ()),
            metadata=dict(data.get("metadata") or {}),
            items_total=len(prompts),
            items_failed=refused,
            deadline=data.get("deadline"),
            config_version=config_version(),
            # Nothing left to run when every prompt was refused.
            **({"status": BatchJob.Status.COMPLETED, "finished_at": now} if refused == len(prompts) else {}),
        )
        BatchItem.objects.bulk_create((_item(job, i, p, now) for i, p in enumerate(prompts)), batch_size=2000)
        destinations.create(job, targets)
        if before_start is not None:
            before_start(job)
        chunks = chunk_ranges((i for i, p in enumerate(prompts) if not p.error), config.batch.chunk_size)
        transaction.on_commit(lambda: _start(job, chunks))
    log.info("batch_created", job_id=str(job.id), tenant_id=str(tenant.id), items=len(prompts), priority=job.priority, worker=job.worker, outcome="ok")
    return job


def _item(job: BatchJob, index: int, prompt: Prompt, now: dt.datetime) -> BatchItem:
    error = prompt.error
    request = dict(prompt.request) if prompt.request is not None else None
    if error is None:
        return BatchItem(job=job, index=index, prompt=prompt.text, custom_id=prompt.custom_id, request=request)
    return BatchItem(job=job, index=index, prompt="", custom_id=prompt.custom_id, status=BatchItem.Status.FAILED, error=error.to_dict(), finished_at=now)


def chunk_ranges(indexes: Iterable[int], size: int) -> list[tuple[int, int]]:
    """The chunks (first, last index, inclusive) of ``size`` that hold the given indexes."""
    starts = sorted({i - i % size for i in indexes})
    return [(start, start + size - 1) for start in starts]


def _start(job: BatchJob, chunks: Sequence[tuple[int, int]]) -> None:
    """A new job's chunks queued, and its urgency noted for the chunks already queued;
    one with nothing to run (every prompt too large) goes to its destinations at once."""
    if chunks:
        urgency.enter(job)
    else:
        queue_delivery(job.pk)
    _enqueue(job, chunks)


def queue_delivery(job_id: object) -> None:
    """A completed job's destinations, to a batch worker. The broker down: the sweep
    finds them due."""
    from batches.tasks import deliver_batch

    try:
        # On batch.high, as the sweep is: a delivery is short, and what waits for it is done.
        deliver_batch.apply_async(args=(str(job_id),), queue=Queue.BATCH_HIGH.value, routing_key=Queue.BATCH_HIGH.value, retry=False)
    except KombuOperationalError as exc:
        log.warning("batch_delivery_unqueued", job_id=str(job_id), outcome="degraded", error_type=type(exc).__name__)


def batch_deliver(*, job_id: str) -> None:
    """The task boundary of an ended job's delivery (an OpenAI batch's output files, then
    a completed job's destinations): nothing escapes into Celery; what did not go is due
    again at the sweep."""
    from batches import openai_batches

    try:
        job = BatchJob.objects.filter(pk=job_id, status__in=(BatchJob.Status.COMPLETED, BatchJob.Status.CANCELLED)).first()
        if job is None:
            return
        openai_batches.finalize(job)
        if job.status == BatchJob.Status.COMPLETED:
            destinations.deliver(job, config_at(job.config_version))
    except DatabaseError as exc:
        log.warning("batch_delivery_interrupted", job_id=job_id, outcome="degraded", error_type=type(exc).__name__)
    except Exception as exc:  # task boundary: logged with its traceback; the sweep tries again when it is due
        log.exception("batch_delivery_crashed", job_id=job_id, outcome="error", error_type=type(exc).__name__)


def _enqueue(job: BatchJob, chunks: Sequence[tuple[int, int]], *, countdown: float = 0.0) -> bool:
    """Put the chunks on the job's queue. False when the broker is down: the job is in
    Postgres, and the recovery sweep queues it once the broker is back."""
    from batches.tasks import run_batch_chunk

    try:
        for first, last in chunks:
            run_batch_chunk.apply_async(args=(str(job.id), first, last), queue=job.queue, routing_key=job.queue, countdown=countdown, retry=False)
    except KombuOperationalError as exc:
        log.warning("batch_enqueue_failed", job_id=str(job.id), outcome="degraded", error_type=type(exc).__name__, chunks=len(chunks))
        return False
    return True


def batch_get(*, tenant_id: str, job_id: Any) -> BatchJob:
    """One of the tenant's jobs; another tenant's is not found."""
    try:
        job = BatchJob.objects.filter(pk=job_id, tenant_id=tenant_id).first()
    except ValidationError:  # not a UUID: no such job either
        job = None
    if job is None:
        raise NotFound("batch job not found", data={"job_id": str(job_id)})
    return job


def batch_cancel(*, tenant_id: str, job_id: Any) -> BatchJob:
    """Stop a job: items not run by now stay pending and are never run. A finished job
    is left as it is."""
    job = batch_get(tenant_id=tenant_id, job_id=job_id)
    if BatchJob.objects.filter(pk=job.pk, status__in=BatchJob.ACTIVE).update(status=BatchJob.Status.CANCELLED, finished_at=timezone.now()):
        log.info("batch_cancelled", job_id=str(job.id), outcome="cancelled")
        urgency.leave(job.pk)
        job.refresh_from_db()
        if _has_openai_files(job):
            queue_delivery(job.pk)  # its output files, of what ran before the cancel
    return job


def batch_retry_failed(*, job_id: Any) -> int:
    """Run a completed job's failed items again (the operator's action: the provider is
    back, a budget was raised). Items refused at submission are not retried: they would
    fail the same way. The job runs again, and its destinations and OpenAI output files
    are made anew when it completes. Returns the items retried."""
    from batches import openai_batches  # it builds on this module

    with transaction.atomic():
        job = BatchJob.objects.select_for_update().filter(pk=job_id, status=BatchJob.Status.COMPLETED).first()
        if job is None:
            return 0
        failed = BatchItem.objects.filter(job=job, status=BatchItem.Status.FAILED, attempts__gt=0)
        indexes = list(failed.values_list("index", flat=True))
        if not indexes:
            return 0
        failed.update(status=BatchItem.Status.PENDING, attempts=0, error=None, finished_at=None, leased_until=None)
        BatchJob.objects.filter(pk=job.pk).update(
            status=BatchJob.Status.RUNNING, items_failed=F("items_failed") - len(indexes), finished_at=None, progressed_at=timezone.now()
        )
        destinations.start_over(job)
        openai_batches.unfinalize(job)
        job.refresh_from_db()
        chunks = chunk_ranges(indexes, config_at(job.config_version).batch.chunk_size)
        transaction.on_commit(lambda: _start(job, chunks))
    log.info("batch_retried", job_id=str(job.id), items=len(indexes), outcome="retry")
    return len(indexes)


def _finalize_if_cancelled(job: BatchJob) -> None:
    """A chunk that stops because its job was cancelled: the batch's output files may be
    written now that its item is recorded (``openai_batches.finalize`` waits for the last)."""
    if _has_openai_files(job, cancelled=True):
        queue_delivery(job.pk)


def _has_openai_files(job: BatchJob, *, cancelled: bool = False) -> bool:
    """Whether the job is an OpenAI batch's (and, with ``cancelled``, cancelled now)."""
    jobs = BatchJob.objects.filter(pk=job.pk, openai__isnull=False)
    return (jobs.filter(status=BatchJob.Status.CANCELLED) if cancelled else jobs).exists()


def batch_run_chunk(*, job_id: str, first: int, last: int) -> None:
    """The task boundary: run a chunk's pending items; nothing escapes into Celery.
    What is left undone stays pending in Postgres for a later run or the sweep."""
    try:
        _run_chunk(job_id, first, last)
    except DatabaseError as exc:
        log.warning("batch_chunk_interrupted", job_id=job_id, first=first, outcome="degraded", error_type=type(exc).__name__)
    except Exception as exc:  # task boundary: logged with its traceback; the sweep re-queues what is left
        log.exception("batch_chunk_crashed", job_id=job_id, first=first, outcome="error", error_type=type(exc).__name__)


def _run_chunk(job_id: str, first: int, last: int) -> None:
    """Run the pending items of ``first``..``last``, ``batch.claim_group`` at a time:
    one transaction claims a group, one records it. When their provider is down, the
    chunk is queued again to run after ``retry_delay_s``."""
    job = BatchJob.objects.select_related("tenant").filter(pk=job_id, status__in=BatchJob.ACTIVE).first()
    if job is None:
        return  # finished, cancelled or deleted: a late or duplicate message
    config = config_at(job.config_version)  # the version the job was submitted on
    if expire_if_due(job):
        return
    BatchJob.objects.filter(pk=job.pk, status=BatchJob.Status.QUEUED).update(status=BatchJob.Status.RUNNING, started_at=timezone.now())
    preemption = urgency.Preemption(job, config.batch.deadline_near_s)
    try:
        while True:
            if expire_if_due(job):
                return
            urgent = preemption.urgent()
            if urgent is not None:
                # A more urgent job's items first, run by this chunk's thread, until none is
                # left free; then this chunk's own. Paused for a while if its provider is down.
                if not _help(urgent, helper=job):
                    preemption.pause(urgent, config.batch.retry_delay_s)
                continue
            group = _claim(job, first, last, config)
            if not group:
                return
            if _run_group(job, group, config, preemption) == GroupEnd.PROVIDER_DOWN:
                _enqueue(job, [(first, last)], countdown=config.batch.retry_delay_s)
                return
    finally:
        _finish_if_complete(job)
        _finalize_if_cancelled(job)


def _help(job_id: str, *, helper: BatchJob) -> bool:
    """Run ``job_id``'s free items, any of them, until none is left; False when its
    provider is down (the item stays pending for its own chunk's retry)."""
    job = BatchJob.objects.select_related("tenant").filter(pk=job_id, status__in=BatchJob.ACTIVE).first()
    if job is None:
        return True
    config = config_at(job.config_version)
    log.info("batch_chunk_preempted", job_id=str(helper.id), by_job_id=job_id, outcome="preempted")
    BatchJob.objects.filter(pk=job.pk, status=BatchJob.Status.QUEUED).update(status=BatchJob.Status.RUNNING, started_at=timezone.now())
    try:
        while not expire_if_due(job) and (group := _claim(job, 0, job.items_total, config)):
            if _run_group(job, group, config) == GroupEnd.PROVIDER_DOWN:
                return False
    finally:
        _finish_if_complete(job)
    return True


class GroupEnd(enum.Enum):
    RAN = "ran"  # every item claimed was run
    YIELDED = "yielded"  # stopped for a more urgent job, or a cancel: the rest released
    PROVIDER_DOWN = "provider_down"  # the provider is down: the rest released, the chunk waits


def _run_group(job: BatchJob, group: list[BatchItem], config: PipelineSettings, preemption: urgency.Preemption | None = None) -> GroupEnd:
    """Run a claimed group's items, one by one, and record what came of them together.
    Before each item but the first, a more urgent job or a cancel stops the group; the
    items not run go back, their attempt not counted."""
    outcomes: list[Outcome] = []
    end, ran = GroupEnd.RAN, 0
    try:
        for ran, item in enumerate(group):
            if ran and _should_yield(job, preemption):
                end = GroupEnd.YIELDED
                break
            outcome = _run_item(job, item, config)
            if outcome is None:
                end = GroupEnd.PROVIDER_DOWN
                ran += 1  # this one was deferred by _run_item itself
                break
            outcomes.append(outcome)
        else:
            ran = len(group)
    finally:
        _record_many(job, outcomes)
    if ran < len(group):
        _release(group[ran:])
    return end


def _should_yield(job: BatchJob, preemption: urgency.Preemption | None) -> bool:
    """Whether a group stops before its next item: a more urgent job waits, or this one
    was cancelled. The urgency check (a Redis round trip) says when the job has left
    its set; Postgres confirms it then, or every item where there is no such check."""
    if preemption is not None and preemption.urgent() is not None:
        return True
    if preemption is None or preemption.gone:
        return not BatchJob.objects.filter(pk=job.pk, status__in=BatchJob.ACTIVE).exists()
    return False


def _release(items: Sequence[BatchItem]) -> None:
    """Claimed items not run after all: free again, the attempt given back."""
    BatchItem.objects.filter(pk__in=[item.pk for item in items], status=BatchItem.Status.PENDING).update(
        leased_until=None, attempts=Greatest(F("attempts") - 1, 0)
    )


def expire_if_due(job: BatchJob, *, now: dt.datetime | None = None) -> bool:
    """At the job's deadline, its items not run yet end ``expired`` (error
    ``batch_expired``; one being run meanwhile is not recorded) and the job completes.
    True when the deadline has passed."""
    now = now or timezone.now()
    if job.deadline is None or job.deadline > now:
        return False
    error = BatchExpired(f"the job's deadline {job.deadline.isoformat()} passed before this item ran", data={"deadline": job.deadline.isoformat()})
    with transaction.atomic():
        expired = BatchItem.objects.filter(job_id=job.pk, status=BatchItem.Status.PENDING).update(
            status=BatchItem.Status.EXPIRED, error=error.to_dict(), finished_at=now, leased_until=None
        )
        if expired:
            BatchJob.objects.filter(pk=job.pk).update(items_expired=F("items_expired") + expired, progressed_at=now)
    if expired:
        metrics.items_finished(job.priority, error.code, expired)
        log.warning("batch_expired", job_id=str(job.id), items=expired, outcome="expired")
    _finish_if_complete(job)
    return True


def _commit_without_waiting() -> None:
    """This transaction's commit does not wait for its WAL to reach the disk
    (``synchronous_commit = off``, for it alone). Claims and records are the batch path's
    commits, one each per group: a Postgres crash may lose the last few hundred
    milliseconds of them, which puts those items back to pending, to be run again (a
    record only takes a pending item: nothing counts twice). Never the job's creation,
    which the client is told about. Only for a transaction of its own: inside a caller's,
    the setting would outlive the savepoint and reach the caller's commit."""
    if len(connection.savepoint_ids) == 0:  # the outermost atomic block: the transaction is ours
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")


def _claim(job: BatchJob, first: int, last: int, config: PipelineSettings) -> list[BatchItem]:
    """The chunk's next pending items nobody holds, up to ``batch.claim_group``, leased
    to this run in one transaction (the attempt is counted now: a worker that dies on
    an item has used an attempt). An item tried before (its run died, or its provider
    was down) is claimed alone: an item that kills its worker then costs only its own
    attempts, not those of the group it came in."""
    now = timezone.now()
    lease = now + dt.timedelta(seconds=config.batch.lease_s)
    with transaction.atomic():
        _commit_without_waiting()
        free = list(
            BatchItem.objects.select_for_update(skip_locked=True, of=("self",))
            .filter(job_id=job.pk, index__gte=first, index__lte=last, status=BatchItem.Status.PENDING, job__status__in=BatchJob.ACTIVE)
            .filter(Q(leased_until__isnull=True) | Q(leased_until__lt=now))
            .order_by("index")[: config.batch.claim_group]
        )
        items = free[:1] if free and free[0].attempts else list(itertools.takewhile(lambda item: item.attempts == 0, free))
        if items:
            BatchItem.objects.filter(pk__in=[item.pk for item in items]).update(attempts=F("attempts") + 1, leased_until=lease)
    for item in items:
        item.attempts, item.leased_until = item.attempts + 1, lease
    return items


def _request_for(job: BatchJob, item: BatchItem, config: PipelineSettings) -> PromptRequest:
    """The item's request: its own body's (an OpenAI batch line), or its prompt with the job's options."""
    request_id, session_id = f"{job.id.hex}-{item.index}", f"batch-{job.id.hex}"
    if item.request is not None:
        return body_request(
            item.request,
            tenant_id=str(job.tenant_id),
            worker=job.worker,
            model=job.model,
            config=config,
            request_id=request_id,
            session_id=session_id,
            tenant_has_documents=job.tenant.has_documents,
        )
    return PromptRequest(
        request_id=request_id,
        tenant_id=str(job.tenant_id),
        session_id=session_id,
        prompt=item.prompt,
        worker=job.worker,
        model=job.model,
        max_tokens=job.max_tokens,
        temperature=job.temperature,
        stop=tuple(job.stop),
        metadata=dict(job.metadata),
        tenant_has_documents=job.tenant.has_documents,  # as the chunk found it: no search for a tenant without any
    )


def body_request(
    body: Mapping[str, Any],
    *,
    tenant_id: str,
    worker: str,
    model: str,
    config: PipelineSettings,
    request_id: str = "",
    session_id: str = "",
    tenant_has_documents: bool = True,
) -> PromptRequest:
    """A ``/v1/chat/completions`` body as a batch item's request on ``worker`` and
    ``model``: its messages, sampling fields and tools, checked as the endpoint checks
    them (an ``OrchestratorError`` says what is wrong). Never streamed, and it shares
    no answer with a real-time request (its own deduplication aside)."""
    data = validated(ChatCompletionInput, dict(body))
    fields = data.request_fields(worker=worker, model=model, max_prompt_chars=config.limits.max_prompt_chars)
    request = infer_build_request(
        tenant_id=tenant_id,
        data=fields,
        config=config,
        tenant_has_documents=tenant_has_documents,
        stream=False,
        route=route_request(config, worker=worker, model=model),
    )
    return dataclasses.replace(request, request_id=request_id or request.request_id, session_id=session_id or request.session_id)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What came of running an item: its answer (and the request, for the ledger), or
    its error."""

    item: BatchItem
    result: PipelineResult | None = None
    error: OrchestratorError | None = None
    request: PromptRequest | None = None


def _run_item(job: BatchJob, item: BatchItem, config: PipelineSettings) -> Outcome | None:
    """Run one item; what came of it, to record. None when its provider is down and the
    item has attempts left (it stays pending: the chunk should pause)."""
    if item.attempts > config.batch.max_attempts:  # earlier runs died on it
        last = OrchestratorError.from_dict(item.error) if item.error else OrchestratorError(f"the item's run was interrupted {item.attempts - 1} times")
        return Outcome(item, error=last)
    observed: list[tuple[str, str, int]] = []
    worker = job.worker

    def run(routed: PromptRequest) -> PipelineResult:
        nonlocal worker
        worker = routed.worker
        held: list[str | None] = []  # the budgets' hold, once the prompt is assembled

        def reserve(prompt: AssembledPrompt) -> None:
            held.append(budgets.hold(routed, config, prompt))

        deps = PipelineDeps(
            config=config,
            retrieve=selectors.document_search,
            load_history=lambda: (),  # items are independent prompts, not turns of a conversation
            worker=worker_pool.get(config, routed.worker),
            publish=lambda chunk: None,  # nobody streams a batch item: the answer is recorded
            before_inference=reserve,
        )
        answered: PipelineResult | None = None
        try:
            answered = run_pipeline(routed, deps, observed)[1]
        finally:
            if held and held[0] is not None and answered is None:
                budgets.release_hold(held[0])  # failed: refunded
        if held and held[0] is not None:
            budgets.settle_hold(held[0], budgets.actual_nano(answered, config))
        return answered

    try:
        request = _request_for(job, item, config)
    except OrchestratorError as exc:  # a line the config it runs on refuses (a worker's seed, say)
        return Outcome(item, error=exc)
    try:
        result = run_guarded(request, config, run)
    except TRANSIENT as exc:
        record_stages(observed, worker)
        if item.attempts >= config.batch.max_attempts:
            return Outcome(item, error=exc)
        BatchItem.objects.filter(pk=item.pk, status=BatchItem.Status.PENDING).update(leased_until=None, error=exc.to_dict())
        metrics.item_finished(job.priority, "retry_later")
        log.warning("batch_item_deferred", job_id=str(job.id), index=item.index, attempts=item.attempts, error_code=exc.code, outcome="retry")
        return None
    except OrchestratorError as exc:
        record_stages(observed, worker)
        return Outcome(item, error=exc)
    except Exception as exc:  # item boundary: one bad item fails alone, with its traceback logged
        log.exception("batch_item_crashed", job_id=str(job.id), index=item.index, outcome="error", error_type=type(exc).__name__)
        return Outcome(item, error=OrchestratorError("internal error while running the item"))
    record_stages(observed, worker)
    # Spent at the provider, even by a duplicate run.
    budgets.count_spend(str(job.tenant_id), result, config)
    return Outcome(item, result=result, request=request)


_RECORD_SQL = """
UPDATE {items} AS i SET
    status = v.status, leased_until = NULL, finished_at = %s,
    output = COALESCE(v.output, i.output), finish_reason = COALESCE(v.finish_reason, i.finish_reason),
    usage = COALESCE(v.usage::jsonb, i.usage), detail = v.detail::jsonb, error = v.error::jsonb
FROM (VALUES {rows}) AS v(id, status, output, finish_reason, usage, detail, error)
WHERE i.id = v.id AND i.status = 'pending'
RETURNING i.id
"""


def _record_many(job: BatchJob, outcomes: Sequence[Outcome]) -> None:
    """Items' answers and errors, and the job's counts, in one transaction of two
    statements; an item answered already (a duplicate run) is neither written nor
    counted again. Then the answers' ledger rows, in one more."""
    if not outcomes:
        return
    now = timezone.now()
    params: list[Any] = [now]
    for outcome in outcomes:
        if outcome.result is not None:
            answer = outcome.result
            status, output, reason, usage = BatchItem.Status.DONE.value, answer.text, answer.finish_reason, json.dumps(answer.usage.to_dict())
            detail, error = detail_of(answer), None
        else:
            status, output, reason, usage, detail = BatchItem.Status.FAILED.value, None, None, None, None
            error = (outcome.error or OrchestratorError()).to_dict()
        params += [outcome.item.pk, status, output, reason, usage, None if detail is None else json.dumps(detail), None if error is None else json.dumps(error)]
    rows = ", ".join(["(%s::bigint, %s, %s, %s, %s, %s, %s)"] * len(outcomes))
    with transaction.atomic(), connection.cursor() as cursor:
        _commit_without_waiting()
        cursor.execute(_RECORD_SQL.format(items=BatchItem._meta.db_table, rows=rows), params)
        written = {row[0] for row in cursor.fetchall()}
        recorded = [outcome for outcome in outcomes if outcome.item.pk in written]
        done = sum(outcome.result is not None for outcome in recorded)
        if recorded:
            BatchJob.objects.filter(pk=job.pk).update(
                items_done=F("items_done") + done, items_failed=F("items_failed") + len(recorded) - done, progressed_at=now
            )
    for outcome in recorded:
        metrics.item_finished(job.priority, "ok" if outcome.result is not None else (outcome.error or OrchestratorError()).code)
    answered = [(o.request, o.result) for o in outcomes if o.result is not None and o.request is not None]
    if answered:
        budgets.ledger_write_answers_safely(answered, config_at(job.config_version))


def detail_of(result: PipelineResult) -> dict[str, Any] | None:
    """What an answer has besides its text, kept with the item: its tool calls and logprobs."""
    detail: dict[str, Any] = {}
    if result.tool_calls:
        detail["tool_calls"] = [call.to_dict() for call in result.tool_calls]
    if result.logprobs is not None:
        detail["logprobs"] = list(result.logprobs)
    return detail or None


def _finish_if_complete(job: BatchJob) -> None:
    """Completed once every item is answered or failed. Each run checks after its own
    commits, so the run that records the last item sees the others'."""
    finished = (
        BatchJob.objects.filter(pk=job.pk, status__in=BatchJob.ACTIVE)
        .alias(settled=F("items_done") + F("items_failed") + F("items_expired"))
        .filter(settled__gte=F("items_total"))
        .update(status=BatchJob.Status.COMPLETED, finished_at=timezone.now())
    )
    if finished:
        urgency.leave(job.pk)
        log.info("batch_completed", job_id=str(job.id), outcome="ok")
        if job.deliveries.exists() or _has_openai_files(job):
            queue_delivery(job.pk)


def batch_recover(*, config: PipelineSettings | None = None, now: dt.datetime | None = None) -> int:
    """Queue again the chunks of active jobs that have not moved for ``stall_after_s``
    and still have items nobody holds (a killed worker's, a lost message's, a broker
    outage's). Run by the scheduler; returns the chunks queued."""
    from batches import openai_batches

    config = config or get_config()
    now = now or timezone.now()
    for due in BatchJob.objects.filter(status__in=BatchJob.ACTIVE, deadline__lte=now):
        expire_if_due(due, now=now)  # a job whose chunks no worker is running expires here
    for job_id in destinations.due(now) + openai_batches.due():
        queue_delivery(job_id)  # a delivery whose retry is due, or whose message was lost
    stalled = BatchJob.objects.filter(status__in=BatchJob.ACTIVE, progressed_at__lt=now - dt.timedelta(seconds=config.batch.stall_after_s))
    queued = 0
    for job in stalled:
        free = BatchItem.objects.filter(job=job, status=BatchItem.Status.PENDING).filter(Q(leased_until__isnull=True) | Q(leased_until__lt=now))
        chunks = chunk_ranges(free.values_list("index", flat=True), config.batch.chunk_size)
        if chunks and _enqueue(job, chunks):
            queued += len(chunks)
            log.warning("batch_requeued", job_id=str(job.id), chunks=len(chunks), outcome="recovered")
        # Not again before another stall_after_s: the queued chunks may wait behind others.
        BatchJob.objects.filter(pk=job.pk).update(progressed_at=now)
    return queued


def batch_recover_boundary() -> None:
    """The sweep's task boundary: a database that is down now is tried at the next sweep."""
    try:
        batch_recover()
    except DatabaseError as exc:
        log.warning("batch_recovery_skipped", outcome="degraded", error_type=type(exc).__name__)
    except Exception as exc:  # task boundary: logged with its traceback, the next sweep tries again
        log.exception("batch_recovery_crashed", outcome="error", error_type=type(exc).__name__)


def batch_results(*, job: BatchJob, after: int, limit: int, among: Collection[int] | None = None) -> list[dict[str, Any]]:
    """Finished items with an index above ``after`` (and in ``among``, when given), in
    index order, as the results endpoint writes them."""
    finished = BatchItem.objects.filter(job=job, index__gt=after, status__in=(BatchItem.Status.DONE, BatchItem.Status.FAILED, BatchItem.Status.EXPIRED))
    if among is not None:
        finished = finished.filter(index__in=list(among))
    items = finished.order_by("index").values("index", "custom_id", "status", "output", "finish_reason", "usage", "error")[:limit]
    return [
        {
            "index": row["index"],
            "custom_id": row["custom_id"],
            "status": row["status"],
            **(
                {"text": row["output"], "finish_reason": row["finish_reason"], "usage": row["usage"]}
                if row["status"] == BatchItem.Status.DONE
                else {"error": row["error"]}
            ),
        }
        for row in items
    ]


RESULTS_PAGE = 1000  # result rows read from Postgres per query while results are written


def result_pages(job: BatchJob, *, after: int = -1, limit: int | None = None) -> Iterator[list[dict[str, Any]]]:
    """The job's finished items (``batch_results``' rows) after index ``after``, a page of
    ``limit`` (``RESULTS_PAGE``) at a time: memory stays flat however large the job."""
    while page := batch_results(job=job, after=after, limit=limit or RESULTS_PAGE):
        yield page
        after = page[-1]["index"]


def ndjson(rows: Iterable[Mapping[str, Any]]) -> bytes:
    """Rows as JSON lines, as every results stream and file writes them."""
    return "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows).encode()


def batch_workers_in_use() -> set[str]:
    """The workers of jobs still running or queued: a config version may not remove them live."""
    return set(BatchJob.objects.filter(status__in=BatchJob.ACTIVE).values_list("worker", flat=True))
