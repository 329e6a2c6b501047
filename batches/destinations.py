"""Where a batch job's results go once it completes: its destinations.

A job names zero or more in ``destinations``, each checked when the job is
submitted (``validated``); a bad one refuses the job with the field named. Each is a
``BatchDelivery`` row, ``pending`` until the job completes, when a batch worker
delivers it (``deliver``). A delivery that fails does not fail the job: it is tried
again after ``batch.delivery_backoff_s`` (doubled each time), up to
``batch.delivery_attempts`` times, then ``failed`` with its error, and the admin
can try it again. The scheduler's sweep picks up what is due, so a worker killed
mid-delivery delays a delivery, and loses nothing. The results stay readable
from ``GET /api/v1/batch/{id}/results`` whatever happens here.

Kinds:

- ``webhook``: ``{"kind": "webhook", "url": "https://…"}``: the results POSTed in
  signed batches of lines, then a ``batch.completed`` event (``batches.webhooks``).
- ``s3``: ``{"kind": "s3", "bucket": "name", "prefix": "runs/"}``: one object
  ``{prefix}{job id}.jsonl``, put whole or uploaded in parts (``batches.s3``).
- ``stream``: ``{"kind": "stream"}``: the results followed live, by
  ``GET /api/v1/batch/{id}/results?follow=true`` or the WebSocket's ``batch_follow``
  (``batches.follow``; any job can be followed, this one says it is meant to be).
  Delivered when the job completes: every line was there to read.
- ``file``: ``{"kind": "file", "path": "name.jsonl"}``, a path under
  ``batch.output_dir``. The results, one JSON object per line in index order (the
  results endpoint's lines, each with its ``index`` and ``custom_id``), are written
  to a temporary file beside it, fsynced, then renamed over it: the file is
  complete or absent, never half written.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import structlog
from django.db.models import Q
from django.utils import timezone

from batches import s3, webhooks
from batches.models import BatchDelivery, BatchJob
from orchestrator_site.errors import DeliveryFailed, InvalidRequest
from pipeline.config import PipelineSettings

log = structlog.get_logger("batches")

KINDS = ("file", "s3", "stream", "webhook")
MAX_DESTINATIONS = 8


def output_dir(config: PipelineSettings) -> Path:
    return Path(config.batch.output_dir).resolve()


def validated(raw: object, config: PipelineSettings) -> list[dict[str, Any]]:
    """The destinations of a job as it is submitted, or ``InvalidRequest`` naming what
    is wrong (``data.field``: ``destinations[N]...``)."""
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_DESTINATIONS:
        raise InvalidRequest(f"destinations must be a list of at most {MAX_DESTINATIONS}", data={"field": "destinations"})
    return [_one(place, item, config) for place, item in enumerate(raw)]


def _one(place: int, item: object, config: PipelineSettings) -> dict[str, Any]:
    field = f"destinations[{place}]"
    if not isinstance(item, Mapping) or item.get("kind") not in KINDS:
        kind = item.get("kind") if isinstance(item, Mapping) else None
        raise InvalidRequest(f"{field}: kind must be one of {', '.join(KINDS)}, not {kind!r}", data={"field": f"{field}.kind", "kinds": list(KINDS)})
    if item["kind"] == "webhook":
        return webhooks.validated(field, dict(item), config)
    if item["kind"] == "s3":
        return s3.validated(field, dict(item), config)
    if item["kind"] == "stream":
        if set(item) != {"kind"}:
            raise InvalidRequest(f"{field}: a stream destination has no other field", data={"field": f"{field}.{sorted(set(item) - {'kind'})[0]}"})
        return {"kind": "stream"}
    extra = set(item) - {"kind", "path"}
    if extra:
        raise InvalidRequest(f"{field}: unknown field {sorted(extra)[0]!r} for a file destination", data={"field": f"{field}.{sorted(extra)[0]}"})
    return {"kind": "file", "path": _file_path(field, item.get("path"), config)}


def _file_path(field: str, raw: object, config: PipelineSettings) -> str:
    """A relative path under the output directory, without ``..``; the directory must be
    writable now (created if missing)."""
    if not isinstance(raw, str) or not raw.strip() or "\x00" in raw or len(raw) > 255:
        raise InvalidRequest(f"{field}: path must be a file name under the output directory", data={"field": f"{field}.path"})
    path = PurePosixPath(raw)
    if path.is_absolute() or ".." in path.parts or raw.endswith("/"):
        raise InvalidRequest(f"{field}: path must be relative to the output directory, without '..'", data={"field": f"{field}.path"})
    root = output_dir(config)
    try:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        writable = os.access(root / path.parent, os.W_OK)
    except OSError as exc:
        raise InvalidRequest(f"{field}: the output directory cannot be written: {exc.strerror}", data={"field": f"{field}.path"}) from exc
    if not writable:
        raise InvalidRequest(f"{field}: the output directory cannot be written", data={"field": f"{field}.path"})
    return str(path)


def create(job: BatchJob, destinations: Sequence[Mapping[str, Any]]) -> None:
    """The job's deliveries, pending (in the job's own transaction)."""
    BatchDelivery.objects.bulk_create(BatchDelivery(job=job, position=place, kind=str(d["kind"]), target=dict(d)) for place, d in enumerate(destinations))


def due(now: dt.datetime | None = None) -> list[str]:
    """The ids of completed jobs with a delivery to try now."""
    now = now or timezone.now()
    rows = BatchDelivery.objects.filter(state=BatchDelivery.State.PENDING, job__status=BatchJob.Status.COMPLETED).filter(
        Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now)
    )
    return sorted({str(job_id) for job_id in rows.values_list("job_id", flat=True)})


def deliver(job: BatchJob, config: PipelineSettings, *, now: dt.datetime | None = None) -> list[BatchDelivery]:
    """Try each pending delivery of a completed job that is due; what was tried."""
    now = now or timezone.now()
    pending = job.deliveries.filter(state=BatchDelivery.State.PENDING).filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
    tried = []
    for delivery in pending:
        # Claimed by moving its next try ahead: a second worker on the same job passes it by.
        lease = now + dt.timedelta(seconds=max(60.0, config.batch.delivery_backoff_s))
        if not BatchDelivery.objects.filter(pk=delivery.pk, attempts=delivery.attempts, state=BatchDelivery.State.PENDING).update(next_attempt_at=lease):
            continue
        tried.append(_attempt(job, delivery, config, now))
    return tried


def _attempt(job: BatchJob, delivery: BatchDelivery, config: PipelineSettings, now: dt.datetime) -> BatchDelivery:
    delivery.attempts += 1
    try:
        delivery.lines = _send(job, delivery, config)
    except DeliveryFailed as error:
        error.data.update(kind=delivery.kind, attempt=delivery.attempts)
        delivery.error = error.to_dict()
        last = delivery.attempts >= config.batch.delivery_attempts
        delivery.state = BatchDelivery.State.FAILED if last else BatchDelivery.State.PENDING
        delivery.next_attempt_at = None if last else now + dt.timedelta(seconds=config.batch.delivery_backoff_s * 2 ** (delivery.attempts - 1))
        log.warning(
            "batch_delivery_failed",
            job_id=str(job.id),
            kind=delivery.kind,
            attempt=delivery.attempts,
            outcome="failed" if last else "retry",
            reason=error.data.get("reason"),
        )
    else:
        delivery.state, delivery.error, delivery.delivered_at, delivery.next_attempt_at = BatchDelivery.State.DELIVERED, None, timezone.now(), None
        log.info("batch_delivered", job_id=str(job.id), kind=delivery.kind, lines=delivery.lines, outcome="ok")
    delivery.save(update_fields=["attempts", "lines", "error", "state", "next_attempt_at", "delivered_at"])
    return delivery


def _send(job: BatchJob, delivery: BatchDelivery, config: PipelineSettings) -> int:
    """Deliver by the destination's kind; the lines delivered, or ``DeliveryFailed``."""
    if delivery.kind == "webhook":
        return webhooks.deliver(job, delivery, config)
    if delivery.kind == "s3":
        return s3.deliver(job, delivery, config)
    if delivery.kind == "stream":
        return job.items_settled  # nothing to push: followers read each line as it finished (batches.follow)
    try:
        return _write_file(job, delivery.target, config)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise DeliveryFailed(f"{delivery.kind}: {reason}", data={"reason": reason}) from exc


def start_over(job: BatchJob) -> None:
    """The job runs again (its failed items retried): each destination is delivered
    anew, from its first line, once it completes."""
    job.deliveries.update(state=BatchDelivery.State.PENDING, attempts=0, error=None, next_attempt_at=None, delivered_at=None, lines=0)


def retry(delivery: BatchDelivery) -> None:
    """A delivery tried again from its first attempt, at the next sweep or now."""
    BatchDelivery.objects.filter(pk=delivery.pk).exclude(state=BatchDelivery.State.DELIVERED).update(
        state=BatchDelivery.State.PENDING, attempts=0, next_attempt_at=None
    )  # a webhook goes on after the lines it delivered (``lines``)


def _write_file(job: BatchJob, target: Mapping[str, Any], config: PipelineSettings) -> int:
    """The results into ``target``'s path: a temporary file beside it, fsynced, renamed
    over it, and the directory fsynced (the rename survives a power cut)."""
    from batches.services import ndjson, result_pages  # the results endpoint's lines, exactly

    final = output_dir(config) / str(target["path"])
    final.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    written = 0
    try:
        with os.fdopen(handle, "wb") as out:
            for page in result_pages(job):
                out.write(ndjson(page))
                written += len(page)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, final)
    except OSError:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return written


def where(delivery: BatchDelivery) -> str:
    """Where a delivery goes, in a word for people: a path, a URL, an S3 object."""
    target = delivery.target
    if delivery.kind == "s3":
        return f"s3://{target.get('bucket')}/{s3.key_of(delivery.job_id, target)}"
    return str(target.get("path") or target.get("url") or "")


def states(job: BatchJob) -> list[dict[str, Any]]:
    """The job's destinations and how their delivery stands, as the API shows them."""
    return [
        {
            **d.target,
            "state": d.state,
            "attempts": d.attempts,
            "lines": d.lines,
            "error": d.error,
            "delivered_at": d.delivered_at.isoformat() if d.delivered_at else None,
            "next_attempt_at": d.next_attempt_at.isoformat() if d.next_attempt_at else None,
        }
        for d in job.deliveries.all()
    ]
