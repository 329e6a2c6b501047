from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from batches.models import BatchItem, BatchJob
from batches.services import batch_cancel


@admin.register(BatchJob)
class BatchJobAdmin(admin.ModelAdmin):
    """Jobs are submitted through the API; operators watch them and may cancel them."""

    list_display = ("id", "tenant", "status", "priority", "worker", "items_total", "items_done", "items_failed", "created_at", "finished_at")
    list_filter = ("status", "priority", "tenant")
    search_fields = ("id",)
    actions = ["cancel"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description="Cancel the selected jobs (items not run yet are never run)")
    def cancel(self, request: HttpRequest, queryset: QuerySet[BatchJob]) -> None:
        cancelled = [job for job in queryset if batch_cancel(tenant_id=str(job.tenant_id), job_id=job.pk).status == BatchJob.Status.CANCELLED]
        self.message_user(request, f"Cancelled {len(cancelled)} job(s).", messages.INFO)


@admin.register(BatchItem)
class BatchItemAdmin(admin.ModelAdmin):
    list_display = ("job", "index", "custom_id", "status", "attempts", "finished_at")
    list_filter = ("status",)
    search_fields = ("job__id", "custom_id")
    list_select_related = ("job",)
    show_full_result_count = False  # a count over millions of items on every page is not worth it

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
