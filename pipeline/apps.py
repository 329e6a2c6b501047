from __future__ import annotations

from django.apps import AppConfig


class PipelineConfig(AppConfig):
    name = "pipeline"
    verbose_name = "Pipeline"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_delete, post_save

        from pipeline import checks  # noqa: F401  (registers the pipeline.toml check)
        from pipeline.api import schema  # noqa: F401  (registers the OpenAPI auth extension)
        from pipeline.auth import forget_cached_keys
        from pipeline.services.budgets import budget_changed

        # A key or tenant saved in this process (the admin) is not served from its cache.
        post_save.connect(forget_cached_keys, sender="pipeline.ApiKey", dispatch_uid="pipeline.auth.apikey")
        post_save.connect(forget_cached_keys, sender="pipeline.Tenant", dispatch_uid="pipeline.auth.tenant")
        # A budget saved or deleted anywhere (the admin, the CLI, the API) reaches Redis
        # once its transaction commits: the next request reserves against it.
        post_save.connect(budget_changed, sender="pipeline.Budget", dispatch_uid="pipeline.budgets.saved")
        post_delete.connect(budget_changed, sender="pipeline.Budget", dispatch_uid="pipeline.budgets.deleted")
