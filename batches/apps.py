from __future__ import annotations

from django.apps import AppConfig


class BatchesConfig(AppConfig):
    name = "batches"
    verbose_name = "Batches"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from batches.services import batch_workers_in_use
        from pipeline.config.versions import register_worker_usage

        register_worker_usage(batch_workers_in_use)
