"""Batch jobs and their items. Postgres is the truth: the broker only carries which
items to look at, so a lost message or a killed worker loses no item."""

from __future__ import annotations

import uuid

from django.db import models

from pipeline.models import Tenant


class BatchJob(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        COMPLETED = "completed"  # every item answered, failed or expired (see items_failed, items_expired)
        CANCELLED = "cancelled"  # items not run by then stay pending

    class Priority(models.TextChoices):
        HIGH = "high"
        DEFAULT = "default"
        LOW = "low"

    ACTIVE = (Status.QUEUED, Status.RUNNING)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="batch_jobs")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    priority = models.CharField(max_length=16, choices=Priority.choices, default=Priority.DEFAULT)
    # Routed once, at submission: every item of a job runs on the same worker and model
    # (or the worker's fallback while its circuit is open).
    worker = models.CharField(max_length=100)
    # The stored config version at submission: every item runs on it (pipeline.config.config_at).
    config_version = models.BigIntegerField(default=0, db_default=0)
    model = models.CharField(max_length=200)
    max_tokens = models.PositiveIntegerField()
    temperature = models.FloatField(null=True, blank=True)
    stop = models.JSONField(default=list, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    items_total = models.PositiveIntegerField()
    items_done = models.PositiveIntegerField(default=0)
    items_failed = models.PositiveIntegerField(default=0)
    items_expired = models.PositiveIntegerField(default=0, db_default=0)
    # When its items must be answered by: they run earliest deadline first within a
    # priority, near it before any other work, and at it the rest expire (batches.urgency).
    deadline = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Moved by every finished item: the recovery sweep re-queues jobs where it stands still.
    progressed_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["tenant", "-created_at"], name="batchjob_tenant_created"),
            models.Index(fields=["status", "progressed_at"], name="batchjob_status_progress"),
        ]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"

    @property
    def queue(self) -> str:
        return f"batch.{self.priority}"

    @property
    def items_settled(self) -> int:
        return self.items_done + self.items_failed + self.items_expired


class BatchItem(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        DONE = "done"
        FAILED = "failed"
        EXPIRED = "expired"  # not run by its job's deadline (error batch_expired)

    id = models.BigAutoField(primary_key=True)
    job = models.ForeignKey(BatchJob, on_delete=models.CASCADE, related_name="items")
    index = models.PositiveIntegerField()
    custom_id = models.CharField(max_length=64, blank=True, default="")
    prompt = models.TextField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    # Who runs it and until when: a pending item with a lease in the future is being run.
    leased_until = models.DateTimeField(null=True, blank=True)
    # An OpenAI batch line's own request body (messages and parameters), validated at
    # submission; None: the item is ``prompt`` with its job's options.
    request = models.JSONField(null=True, blank=True)
    output = models.TextField(blank=True, default="")
    # What an answer has besides its text, when it has it: tool_calls, logprobs.
    detail = models.JSONField(null=True, blank=True)
    finish_reason = models.CharField(max_length=32, blank=True, default="")
    usage = models.JSONField(default=dict, blank=True)
    error = models.JSONField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["job", "index"]
        constraints = [models.UniqueConstraint(fields=["job", "index"], name="batchitem_job_index")]
        indexes = [models.Index(fields=["job", "status", "index"], name="batchitem_job_status")]

    def __str__(self) -> str:
        return f"{self.job_id}#{self.index}"


class BatchDelivery(models.Model):
    """Where a job's results go once it completes (``batches.destinations``), and how
    that went. A destination that fails does not fail the job: it is retried, and the
    results stay readable from the API."""

    class State(models.TextChoices):
        PENDING = "pending"
        DELIVERED = "delivered"
        FAILED = "failed"  # tried delivery_attempts times (the admin can retry it)

    id = models.BigAutoField(primary_key=True)
    job = models.ForeignKey(BatchJob, on_delete=models.CASCADE, related_name="deliveries")
    position = models.PositiveSmallIntegerField()  # its place in the job's list
    kind = models.CharField(max_length=16)
    target = models.JSONField()  # the destination as validated at submission
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    error = models.JSONField(null=True, blank=True)  # the last failure's
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    lines = models.PositiveIntegerField(default=0)  # written, once delivered

    class Meta:
        ordering = ["job", "position"]
        constraints = [models.UniqueConstraint(fields=["job", "position"], name="batchdelivery_job_position")]
        indexes = [models.Index(fields=["state", "next_attempt_at"], name="batchdelivery_state_next")]

    def __str__(self) -> str:
        return f"{self.job_id} → {self.kind} ({self.state})"


def _file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def _batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


class BatchFile(models.Model):
    """A file of the OpenAI-compatible Files API (``batches.openai_batches``). An upload
    (purpose ``batch``) keeps its bytes; a batch's output or error file (``batch_output``)
    is written from its items when asked for, so results are stored once."""

    class Purpose(models.TextChoices):
        BATCH = "batch"
        BATCH_OUTPUT = "batch_output"

    id = models.CharField(primary_key=True, max_length=64, default=_file_id, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="batch_files")
    purpose = models.CharField(max_length=16, choices=Purpose.choices)
    filename = models.CharField(max_length=255)
    bytes = models.PositiveBigIntegerField()
    content = models.BinaryField(null=True, blank=True)  # an upload's; None for an output file
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["tenant", "-created_at"], name="batchfile_tenant_created")]

    def __str__(self) -> str:
        return f"{self.id} ({self.purpose})"


class OpenAIBatch(models.Model):
    """A batch of the OpenAI-compatible Batch API: its job, the file it came from, and the
    output and error files written once the job has ended (``finalized_at``)."""

    id = models.CharField(primary_key=True, max_length=64, default=_batch_id, editable=False)
    job = models.OneToOneField(BatchJob, on_delete=models.CASCADE, related_name="openai")
    input_file = models.ForeignKey(BatchFile, null=True, blank=True, on_delete=models.SET_NULL, related_name="batches")  # None: deleted since
    endpoint = models.CharField(max_length=64)
    completion_window = models.CharField(max_length=16)
    output_file = models.OneToOneField(BatchFile, null=True, blank=True, on_delete=models.SET_NULL, related_name="output_of")
    error_file = models.OneToOneField(BatchFile, null=True, blank=True, on_delete=models.SET_NULL, related_name="errors_of")
    finalized_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-job__created_at"]

    def __str__(self) -> str:
        return self.id
