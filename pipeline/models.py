"""What must last: tenants, API keys (hashed), RAG documents, session turns, budgets
and the usage ledger."""

from __future__ import annotations

import uuid

from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVector, SearchVectorField
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q


class Tenant(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100, unique=True)
    is_active = models.BooleanField(default=True)
    # Empty: the default of pipeline.toml's [rate_limits]; 0: no limit.
    requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Blank: the default of pipeline.toml's [rate_limits]. 0: no limit for this tenant."
    )
    tokens_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Blank: the default of pipeline.toml's [rate_limits]. 0: no limit for this tenant."
    )
    # Kept by services.documents; read with the cached key, so that a request of a tenant
    # with no documents skips the RAG search (which would find nothing).
    has_documents = models.BooleanField(default=False, db_default=False, editable=False)
    # Signs the tenant's batch webhooks (Standard Webhooks: "whsec_" + base64); made on
    # first use (batches.webhooks.secret_of).
    webhook_secret = models.CharField(max_length=64, blank=True, default="", db_default="", editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ApiKey(models.Model):
    """Only the SHA-256 of a key is stored; ``prefix`` stays visible to tell keys apart."""

    id = models.BigAutoField(primary_key=True)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True, default="")
    prefix = models.CharField(max_length=16, db_index=True, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.tenant})"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None


class Document(models.Model):
    """A tenant's RAG document, searched with Postgres full-text search."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="documents")
    title = models.CharField(max_length=300)
    body = models.TextField()
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Computed by Postgres on every write, so no code path can forget to update it.
    search_vector = models.GeneratedField(
        expression=SearchVector("title", weight="A", config="english") + SearchVector("body", weight="B", config="english"),
        output_field=SearchVectorField(),
        db_persist=True,
    )

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            GinIndex(fields=["search_vector"], name="document_search_gin"),
            models.Index(fields=["tenant", "-created_at"], name="document_tenant_created"),
        ]

    def __str__(self) -> str:
        return self.title


class SessionTurn(models.Model):
    """One message of a conversation; assemble replays the latest turns of a session.
    A request adds one pair (its prompt and its reply), written by the attempt that
    answered it (``services.sessions``)."""

    id = models.BigAutoField(primary_key=True)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="turns")
    session_id = models.CharField(max_length=128)
    request_id = models.CharField(max_length=64)
    role = models.CharField(max_length=16, choices=[("user", "user"), ("assistant", "assistant")])
    content = models.TextField()
    attempt = models.PositiveIntegerField(default=1, db_default=1)  # db_default: a worker of the version before writes no attempt
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["tenant", "session_id", "-id"], name="turn_session_recent")]
        constraints = [models.UniqueConstraint(fields=["request_id", "role"], name="turn_once_per_request")]

    def __str__(self) -> str:
        return f"{self.session_id}:{self.role}"


class ConfigSource(models.TextChoices):
    FILE = "file", "the PIPELINE_CONFIG file"
    ADMIN = "admin", "the admin"
    CLI = "cli", "the orchestrator command"


class ConfigApplies(models.TextChoices):
    LIVE = "live", "live, in every process"
    AT_RESTART = "at_restart", "when each process starts"


class PipelineConfigVersion(models.Model):
    """One version of ``pipeline.toml``, as text. Versions are never edited: a change is
    a new version, and a rollback activates an older one. ``scope`` keeps apart the
    versions of deployments that share a database (``PIPELINE_CONFIG_SCOPE``)."""

    id = models.BigAutoField(primary_key=True)
    scope = models.CharField(max_length=100, default="default")
    text = models.TextField()
    digest = models.CharField(max_length=64)  # SHA-256 of the text: a file imported again is not a new version
    source = models.CharField(max_length=8, choices=ConfigSource.choices)
    author = models.CharField(max_length=150, blank=True, default="")
    comment = models.CharField(max_length=500, blank=True, default="")
    valid = models.BooleanField()
    problems = models.JSONField(default=list, blank=True)  # each {"path", "message", "line"}
    is_active = models.BooleanField(default=False)
    applies = models.CharField(max_length=16, choices=ConfigApplies.choices, default=ConfigApplies.LIVE)
    activated_at = models.DateTimeField(null=True, blank=True)
    activated_by = models.CharField(max_length=150, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]
        verbose_name = "pipeline config version"
        indexes = [models.Index(fields=["scope", "source", "-id"], name="config_scope_source_recent")]
        constraints = [
            # One active version per scope: activation clears the old one in the same transaction.
            models.UniqueConstraint(fields=["scope"], condition=models.Q(is_active=True), name="config_one_active_per_scope"),
            # Only a valid version can be active.
            models.CheckConstraint(condition=models.Q(is_active=False) | models.Q(valid=True), name="config_active_is_valid"),
        ]

    def __str__(self) -> str:
        return f"version {self.id}"


class BudgetScope(models.TextChoices):
    TENANT = "tenant", "tenant"
    KEY = "key", "API key"
    SESSION = "session", "session"


class BudgetPeriod(models.TextChoices):
    DAY = "day", "per day (UTC)"
    MONTH = "month", "per month (UTC)"
    TOTAL = "total", "in total"


class Budget(models.Model):
    """At most ``amount_usd`` of spend per period, on a tenant, one of its API keys, or
    one of its sessions. Every budget that applies to a request must cover it
    (``services.budgets``); Redis keeps the running spend, the ledger the record."""

    id = models.BigAutoField(primary_key=True)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="budgets")
    scope = models.CharField(max_length=8, choices=BudgetScope.choices, default=BudgetScope.TENANT)
    api_key = models.ForeignKey(
        ApiKey, on_delete=models.CASCADE, null=True, blank=True, related_name="budgets", help_text="The key this budget is on (scope: API key)."
    )
    session_id = models.CharField(max_length=128, blank=True, default="", help_text="The session this budget is on (scope: session).")
    amount_usd = models.DecimalField(max_digits=14, decimal_places=6, validators=[MinValueValidator(0)], help_text="USD per period.")
    period = models.CharField(max_length=8, choices=BudgetPeriod.choices, default=BudgetPeriod.MONTH)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["tenant__name", "scope", "id"]
        constraints = [
            models.CheckConstraint(
                condition=(
                    Q(scope="tenant", api_key__isnull=True, session_id="")
                    | Q(scope="key", api_key__isnull=False, session_id="")
                    | Q(scope="session", api_key__isnull=True) & ~Q(session_id="")
                ),
                name="budget_scope_names_its_target",
                violation_error_message="A tenant budget names no key and no session; a key budget names its key; a session budget names its session.",
            ),
            models.CheckConstraint(condition=Q(amount_usd__gte=0), name="budget_amount_not_negative"),
            models.UniqueConstraint(
                fields=["tenant"], condition=Q(scope="tenant"), name="budget_one_per_tenant", violation_error_message="This tenant has a budget already."
            ),
            models.UniqueConstraint(
                fields=["api_key"], condition=Q(scope="key"), name="budget_one_per_key", violation_error_message="This key has a budget already."
            ),
            models.UniqueConstraint(
                fields=["tenant", "session_id"],
                condition=Q(scope="session"),
                name="budget_one_per_session",
                violation_error_message="This session has a budget already.",
            ),
        ]

    def __str__(self) -> str:
        target = {"key": f"key {self.api_key_id}", "session": f"session {self.session_id}"}.get(self.scope, "tenant")
        return f"{self.tenant} {target}: {self.amount_usd} USD {self.period}"


class UsageOutcome(models.TextChoices):
    ANSWERED = "answered", "answered"
    FAILED = "failed", "failed after tokens (charged its reservation)"


class UsageEntry(models.Model):
    """The usage ledger: one row per request that cost something, with what it cost.
    Reports and budget rebuilds read it, so neither depends on Redis."""

    id = models.BigAutoField(primary_key=True)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="usage")
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="usage")
    session_id = models.CharField(max_length=128, blank=True, default="")
    request_id = models.CharField(max_length=64, unique=True)
    worker = models.CharField(max_length=64)
    model = models.CharField(max_length=200)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=18, decimal_places=9)
    outcome = models.CharField(max_length=8, choices=UsageOutcome.choices, default=UsageOutcome.ANSWERED)
    attempt = models.PositiveIntegerField(default=1)  # the run that answered: a later one's row replaces an earlier one's
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["tenant", "created_at"], name="usage_tenant_time")]
        verbose_name_plural = "usage entries"

    def __str__(self) -> str:
        return f"{self.request_id}: {self.cost_usd} USD"
