"""The ``s3`` destination: a completed job's results as one JSONL object in a bucket.

``{"kind": "s3", "bucket": "name", "prefix": "runs/", "endpoint_url": "…", "region": "…"}``:
the object is ``{prefix}{job id}.jsonl``, the results endpoint's lines in index
order. Credentials come from the environment as boto3 reads them
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, a profile, an instance role), and
so does ``AWS_ENDPOINT_URL`` when the destination names no ``endpoint_url``.

The bucket is checked when the job is submitted (``HeadBucket``): one that does not
exist, or that these credentials cannot reach, refuses the job. An ``endpoint_url``
must pass the webhook URLs' address check (public, or in ``batch.webhook_allow``).

Results up to ``batch.s3_part_mb`` go up in one ``PutObject``; larger ones as a
multipart upload of parts that size, completed at the end. Either way the object
appears only whole: a failure aborts the upload, and the next attempt first aborts
any upload of the same key that an earlier, killed, attempt left behind. Every
attempt writes the whole object again under the same key, so a repeat overwrites
and never duplicates.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import structlog
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from batches import webhooks
from batches.models import BatchDelivery, BatchJob
from orchestrator_site.errors import DeliveryFailed, InvalidRequest
from pipeline.config import PipelineSettings

log = structlog.get_logger("batches")

FIELDS = {"kind", "bucket", "prefix", "endpoint_url", "region"}
# S3's bucket names: 3 to 63 lowercase letters, digits, dots and hyphens, a letter or
# digit at each end.
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
REGION = re.compile(r"[a-z0-9-]{1,32}")
MAX_PREFIX = 900  # S3 keys are at most 1,024 bytes; the job id and suffix need 41


def validated(field: str, item: dict[str, Any], config: PipelineSettings) -> dict[str, Any]:
    """An s3 destination as submitted, its bucket reachable now; ``InvalidRequest``
    naming the field otherwise."""
    extra = set(item) - FIELDS
    if extra:
        raise InvalidRequest(f"{field}: unknown field {sorted(extra)[0]!r} for an s3 destination", data={"field": f"{field}.{sorted(extra)[0]}"})
    bucket, prefix = item.get("bucket"), item.get("prefix", "")
    if not isinstance(bucket, str) or not BUCKET.fullmatch(bucket):
        raise InvalidRequest(f"{field}: bucket must be an S3 bucket name (3 to 63 of a-z 0-9 . -)", data={"field": f"{field}.bucket"})
    if not isinstance(prefix, str) or len(prefix.encode()) > MAX_PREFIX or prefix.startswith("/") or "\x00" in prefix:
        raise InvalidRequest(f"{field}: prefix must be a key prefix of at most {MAX_PREFIX} bytes, not starting with '/'", data={"field": f"{field}.prefix"})
    target: dict[str, Any] = {"kind": "s3", "bucket": bucket, "prefix": prefix}
    if item.get("region") is not None:
        if not isinstance(item["region"], str) or not REGION.fullmatch(item["region"]):
            raise InvalidRequest(f"{field}: region must be a region name such as eu-west-1", data={"field": f"{field}.region"})
        target["region"] = item["region"]
    if item.get("endpoint_url") is not None:
        try:
            target["endpoint_url"], _ = webhooks.checked_url(item["endpoint_url"], config)
        except ValueError as exc:
            raise InvalidRequest(f"{field}: endpoint_url: {exc}", data={"field": f"{field}.endpoint_url"}) from exc
    try:
        _client(target, config).head_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError) as exc:
        raise InvalidRequest(f"{field}: bucket {bucket!r} cannot be used: {_reason(exc)}", data={"field": f"{field}.bucket"}) from exc
    return target


def key_of(job_id: uuid.UUID, target: dict[str, Any]) -> str:
    return f"{target.get('prefix', '')}{job_id}.jsonl"


def deliver(job: BatchJob, delivery: BatchDelivery, config: PipelineSettings) -> int:
    """Upload the job's results whole; the lines delivered, or ``DeliveryFailed``."""
    from batches.services import result_pages  # the results endpoint's lines, exactly

    target = delivery.target
    bucket, key = str(target["bucket"]), key_of(job.id, target)
    part_bytes = config.batch.s3_part_mb * 1024 * 1024
    client = _client(target, config)
    written, upload_id = 0, ""
    try:
        if target.get("endpoint_url"):
            webhooks.checked_url(target["endpoint_url"], config)  # ValueError: refused now, as at submission
        _abort_leftovers(client, bucket, key)
        parts: list[dict[str, Any]] = []
        for body, lines in _parts(result_pages(job), part_bytes):
            if not upload_id and len(body) >= part_bytes:  # more than one part's worth: multipart
                upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, ContentType="application/jsonl")["UploadId"]
            if upload_id:
                number = len(parts) + 1
                etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body)["ETag"]
                parts.append({"PartNumber": number, "ETag": etag})
            else:
                client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/jsonl")
            written += lines
        if upload_id:
            client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
    except ValueError as exc:  # the endpoint's address no longer passes the check
        raise DeliveryFailed(f"s3: endpoint_url: {exc}", data={"reason": str(exc)}) from exc
    except (BotoCoreError, ClientError) as exc:
        if upload_id:
            _abort(client, bucket, key, upload_id)
        reason = _reason(exc)
        raise DeliveryFailed(f"s3: {reason}", data={"reason": reason}) from exc
    return written


def _parts(pages: Iterator[list[dict[str, Any]]], part_bytes: int) -> Iterator[tuple[bytes, int]]:
    """The result lines gathered into bodies of ``part_bytes`` or a line more (the last
    one smaller), each with its line count; one body at least, empty for a job without
    lines."""
    from batches.services import ndjson

    buffer, lines, sent = bytearray(), 0, False
    for page in pages:
        for row in page:
            buffer += ndjson((row,))
            lines += 1
            if len(buffer) >= part_bytes:
                yield bytes(buffer), lines
                buffer, lines, sent = bytearray(), 0, True
    if buffer or not sent:
        yield bytes(buffer), lines


def _abort_leftovers(client: Any, bucket: str, key: str) -> None:
    """Abort the uploads of this key that an earlier attempt, killed, left open."""
    listed = client.list_multipart_uploads(Bucket=bucket, Prefix=key)
    for upload in listed.get("Uploads", []):
        if upload["Key"] == key:
            _abort(client, bucket, key, upload["UploadId"])


def _abort(client: Any, bucket: str, key: str, upload_id: str) -> None:
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except (BotoCoreError, ClientError) as exc:
        # S3 down: the next attempt aborts it (``_abort_leftovers``), or the bucket's lifecycle rule does.
        log.warning("batch_s3_abort_failed", bucket=bucket, key=key, outcome="degraded", error_type=type(exc).__name__)


def _client(target: dict[str, Any], config: PipelineSettings) -> Any:
    settings = Config(
        connect_timeout=config.batch.s3_timeout_s,
        read_timeout=config.batch.s3_timeout_s,
        retries={"mode": "standard", "max_attempts": 3},
    )
    return boto3.session.Session().client("s3", endpoint_url=target.get("endpoint_url"), region_name=target.get("region"), config=settings)


def _reason(exc: BotoCoreError | ClientError) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket"):
            return "it does not exist"
        if code in ("403", "AccessDenied"):
            return "access denied"
        return f"{code or 'error'} (HTTP {status}): {error.get('Message', '')}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"
