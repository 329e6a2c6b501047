from __future__ import annotations

from django.apps import AppConfig


class PipelineConfig(AppConfig):
    name = "pipeline"
    verbose_name = "Pipeline"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from pipeline import checks  # noqa: F401  (registers the pipeline.toml check)
        from pipeline.api import schema  # noqa: F401  (registers the OpenAPI auth extension)
