from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from orchestrator_site.errors import OrchestratorError
from pipeline.auth import api_key_issue, api_key_revoke
from pipeline.config import Problem, check_text
from pipeline.config.versions import current_scope, diff_against_active, version_activate, version_active, version_build
from pipeline.models import ApiKey, Budget, ConfigSource, Document, PipelineConfigVersion, SessionTurn, Tenant, UsageEntry
from pipeline.services import budgets


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    extra = 0
    fields = ("prefix", "name", "created_at", "revoked_at")
    readonly_fields = ("prefix", "created_at", "revoked_at")
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # keys are issued with the "issue a new API key" action, which shows the key once


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ("name", "is_active", "requests_per_minute", "tokens_per_minute", "created_at")
    search_fields = ("name",)
    inlines = [ApiKeyInline]
    actions = ["issue_key"]

    @admin.action(description="Issue a new API key (shown once)")
    def issue_key(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        for tenant in queryset:
            issued = api_key_issue(tenant=tenant, name="admin")
            self.message_user(request, f"New key for {tenant.name}: {issued.raw} — copy it now, it is not stored.", messages.WARNING)


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("prefix", "tenant", "name", "created_at", "revoked_at")
    list_filter = ("tenant",)
    readonly_fields = ("tenant", "prefix", "key_hash", "created_at", "revoked_at")
    fields = ("tenant", "name", "prefix", "key_hash", "created_at", "revoked_at")
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        for key in queryset:
            api_key_revoke(api_key=key)
        self.message_user(request, f"Revoked {queryset.count()} key(s).")


@admin.register(Document)
class DocumentAdmin(admin.ModelAdmin):
    list_display = ("title", "tenant", "created_at")
    list_filter = ("tenant",)
    search_fields = ("title",)
    fields = ("tenant", "title", "body", "metadata")


@admin.register(SessionTurn)
class SessionTurnAdmin(admin.ModelAdmin):
    list_display = ("session_id", "tenant", "role", "request_id", "created_at")
    list_filter = ("tenant", "role")
    search_fields = ("session_id", "request_id")
    readonly_fields = ("tenant", "session_id", "request_id", "role", "content", "created_at")


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin):
    """Budgets, with their spend in the current period. A change applies to the next
    request (published to Redis when it commits: ``services.budgets``)."""

    list_display = ("__str__", "tenant", "scope", "period", "amount_usd", "spent", "remaining", "resets")
    list_filter = ("tenant", "scope", "period")
    search_fields = ("session_id", "api_key__prefix")
    fields = ("tenant", "scope", "api_key", "session_id", "amount_usd", "period")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Budget]:
        return super().get_queryset(request).select_related("tenant", "api_key")

    def _standing(self, obj: Budget) -> budgets.Standing:
        # One list page reads each row's figures once, not once per column.
        cached: budgets.Standing | None = getattr(obj, "_standing", None)
        if cached is None:
            cached = budgets.standings([obj])[0]
            obj._standing = cached  # type: ignore[attr-defined]
        return cached

    @admin.display(description="spent (USD)")
    def spent(self, obj: Budget) -> str:
        return str(budgets.usd(self._standing(obj).spent_nano))

    @admin.display(description="remaining (USD)")
    def remaining(self, obj: Budget) -> str:
        return str(budgets.usd(self._standing(obj).remaining_nano))

    @admin.display(description="resets at (UTC)")
    def resets(self, obj: Budget) -> str:
        at = self._standing(obj).resets_at
        return at.strftime("%Y-%m-%d %H:%M") if at else "never"


@admin.register(UsageEntry)
class UsageEntryAdmin(admin.ModelAdmin):
    """The usage ledger, read-only: what each request cost."""

    list_display = ("request_id", "tenant", "worker", "model", "prompt_tokens", "completion_tokens", "cost_usd", "outcome", "created_at")
    list_filter = ("tenant", "worker", "outcome", ("created_at", admin.DateFieldListFilter))
    search_fields = ("request_id", "session_id")
    date_hierarchy = "created_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ConfigVersionForm(forms.ModelForm):
    """A new version: validated as the CLI and the file are; nothing is saved when invalid."""

    class Meta:
        model = PipelineConfigVersion
        fields = ("text", "comment")
        widgets = {"text": forms.Textarea(attrs={"rows": 30, "cols": 100, "style": "font-family: monospace"})}

    def clean_text(self) -> str:
        text = str(self.cleaned_data["text"]).replace("\r\n", "\n")
        problems = check_text(text).problems
        if problems:
            raise forms.ValidationError([p.render("pipeline.toml") for p in problems])
        return text


@admin.register(PipelineConfigVersion)
class PipelineConfigVersionAdmin(admin.ModelAdmin):
    """Versions are never edited: "add" makes a new one (from the active version's
    text, or ``?copy_from=N``'s), and an action activates one, which is also how a
    rollback is made."""

    form = ConfigVersionForm
    list_display = ("id", "pipeline_name", "is_active", "applies", "valid", "source", "author", "comment", "created_at", "activated_at")
    list_filter = ("is_active", "valid", "source")
    actions = ["activate_live", "activate_at_restart"]
    readonly_fields = ("scope", "source", "author", "valid", "problems_text", "is_active", "applies", "activated_at", "activated_by", "created_at", "diff")

    def get_queryset(self, request: HttpRequest) -> QuerySet[PipelineConfigVersion]:
        return super().get_queryset(request).filter(scope=current_scope())

    def get_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        if obj is None:
            return ("text", "comment")
        return ("text", "comment", *self.readonly_fields)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        return ("text", "comment", *self.readonly_fields) if obj is not None else ()

    def get_changeform_initial_data(self, request: HttpRequest) -> dict[str, Any]:
        source = request.GET.get("copy_from")
        version = PipelineConfigVersion.objects.filter(scope=current_scope(), id=int(source)).first() if source and source.isdigit() else version_active()
        return {"text": version.text} if version is not None else {}

    def save_model(self, request: HttpRequest, obj: PipelineConfigVersion, form: Any, change: bool) -> None:
        built = version_build(text=obj.text, source=ConfigSource.ADMIN, author=getattr(request.user, "username", ""), comment=obj.comment)
        for field in ("scope", "digest", "source", "author", "valid", "problems"):
            setattr(obj, field, getattr(built, field))
        obj.save()
        self.message_user(request, f"Saved as version {obj.id}. Activate it with the action on the list to apply it.", messages.INFO)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # history is kept: a rollback activates an older version

    @admin.display(description="pipeline")
    def pipeline_name(self, obj: PipelineConfigVersion) -> str:
        return obj.text and _pipeline_name(obj.text)

    @admin.display(description="problems")
    def problems_text(self, obj: PipelineConfigVersion) -> str:
        return "\n".join(Problem(**p).render("pipeline.toml") for p in obj.problems) or "none"

    @admin.display(description="diff against the active version")
    def diff(self, obj: PipelineConfigVersion) -> str:
        return format_html("<pre>{}</pre>", diff_against_active(obj) or "(this is the active version, or there is none)")

    def _activate(self, request: HttpRequest, queryset: QuerySet[PipelineConfigVersion], *, at_restart: bool) -> None:
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one version to activate.", messages.ERROR)
            return
        version = queryset.get()
        try:
            version_activate(version_id=version.id, by=getattr(request.user, "username", ""), at_restart=at_restart)
        except OrchestratorError as exc:  # refused (needs a restart, invalid) or Redis down: said, nothing changed
            self.message_user(request, exc.message, messages.ERROR)
            return
        when = "when each process restarts" if at_restart else "in every process within a second"
        self.message_user(request, f"Version {version.id} is active: it applies {when}.", messages.SUCCESS)

    @admin.action(description="Activate the selected version (live; also a rollback)")
    def activate_live(self, request: HttpRequest, queryset: QuerySet[PipelineConfigVersion]) -> None:
        self._activate(request, queryset, at_restart=False)

    @admin.action(description="Activate the selected version at restart (changes that need one)")
    def activate_at_restart(self, request: HttpRequest, queryset: QuerySet[PipelineConfigVersion]) -> None:
        self._activate(request, queryset, at_restart=True)


def _pipeline_name(text: str) -> str:
    checked = check_text(text)
    return checked.settings.pipeline.name if checked.settings is not None else "(invalid)"
