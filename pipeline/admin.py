from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from pipeline.auth import api_key_issue, api_key_revoke
from pipeline.models import ApiKey, Document, SessionTurn, Tenant


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
