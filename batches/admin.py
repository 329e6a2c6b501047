from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, StreamingHttpResponse
from django.shortcuts import get_object_or_404
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join

from batches import destinations, openai_batches
from batches.api.views import results_stream
from batches.models import BatchDelivery, BatchItem, BatchJob, OpenAIBatch
from batches.services import batch_cancel, batch_retry_failed, queue_delivery


@admin.register(BatchJob)
class BatchJobAdmin(admin.ModelAdmin):
    """Jobs are submitted through the API; operators watch them and may cancel them."""

    list_display = (
        "id",
        "tenant",
        "status",
        "progress_shown",
        "priority",
        "deadline",
        "worker",
        "items_total",
        "items_done",
        "items_failed",
        "items_expired",
        "created_at",
        "finished_at",
    )
    list_filter = ("status", "priority", "tenant")
    search_fields = ("id",)
    actions = ["cancel", "retry_failed_items", "retry_deliveries"]
    readonly_fields = ("progress_shown", "items_shown", "deliveries_shown")
    ITEMS_SHOWN = 100  # a job may have 50,000: the rest are on the batch items page, filtered by job

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        return ("progress_shown", *(f.name for f in BatchJob._meta.fields), "deliveries_shown", "items_shown")

    def get_urls(self) -> list[URLPattern]:
        download = path("<uuid:job_id>/results/", self.admin_site.admin_view(self.results_view), name="batches_batchjob_results")
        return [download, *super().get_urls()]

    def results_view(self, request: HttpRequest, job_id: Any) -> StreamingHttpResponse:
        """The job's results as the API's NDJSON, to download (staff only)."""
        job = get_object_or_404(BatchJob, pk=job_id)
        response = StreamingHttpResponse(results_stream(job), content_type="application/x-ndjson")
        response["Content-Disposition"] = f'attachment; filename="batch-{job.pk}.jsonl"'
        return response

    @admin.display(description="progress")
    def progress_shown(self, obj: BatchJob) -> str:
        settled = obj.items_settled
        share = settled / obj.items_total if obj.items_total else 1.0
        return format_html(
            '<progress value="{}" max="{}"></progress> {}% ({} done, {} failed, {} expired of {})',
            settled,
            obj.items_total,
            round(share * 100),
            obj.items_done,
            obj.items_failed,
            obj.items_expired,
            obj.items_total,
        )

    @admin.display(description="destinations")
    def deliveries_shown(self, obj: BatchJob) -> str:
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((d.kind, destinations.where(d), d.state, d.attempts, (d.error or {}).get("message", "")) for d in obj.deliveries.all()),
        )
        return format_html("<table><tr><th>kind</th><th>target</th><th>state</th><th>attempts</th><th>last error</th></tr>{}</table>", rows)

    @admin.display(description="items and their results")
    def items_shown(self, obj: BatchJob) -> str:
        items = obj.items.order_by("index")[: self.ITEMS_SHOWN]
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((i.index, i.custom_id, i.status, i.attempts, i.output or (i.error or {}).get("code", "")) for i in items),
        )
        more = format_html(
            '<p><a href="{}?job__id__exact={}">all {} items</a> · <a href="{}">download the results (NDJSON)</a></p>',
            reverse("admin:batches_batchitem_changelist"),
            obj.pk,
            obj.items_total,
            reverse("admin:batches_batchjob_results", args=(obj.pk,)),
        )
        return format_html("<table><tr><th>index</th><th>custom_id</th><th>status</th><th>attempts</th><th>result</th></tr>{}</table>{}", rows, more)

    @admin.action(description="Retry the selected jobs' undelivered destinations")
    def retry_deliveries(self, request: HttpRequest, queryset: QuerySet[BatchJob]) -> None:
        waiting = list(BatchDelivery.objects.filter(job__in=queryset, job__status=BatchJob.Status.COMPLETED).exclude(state=BatchDelivery.State.DELIVERED))
        for delivery in waiting:
            destinations.retry(delivery)
        for job_id in {d.job_id for d in waiting}:
            queue_delivery(job_id)
        self.message_user(request, f"{len(waiting)} destination(s) of completed jobs are being delivered again.", messages.INFO)

    @admin.action(description="Run the selected completed jobs' failed items again")
    def retry_failed_items(self, request: HttpRequest, queryset: QuerySet[BatchJob]) -> None:
        retried = sum(batch_retry_failed(job_id=job.pk) for job in queryset)
        self.message_user(request, f"{retried} failed item(s) are being run again.", messages.INFO)

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


@admin.register(OpenAIBatch)
class OpenAIBatchAdmin(admin.ModelAdmin):
    """Batches of the OpenAI-compatible API: each is a job, whose page has its items and actions."""

    list_display = ("id", "job", "status_shown", "input_file", "output_file", "error_file", "finalized_at")
    list_select_related = ("job",)
    search_fields = ("id", "job__id")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="status")
    def status_shown(self, obj: OpenAIBatch) -> str:
        return openai_batches.status_of(obj)
