from __future__ import annotations

from django.apps import AppConfig


class OrchestratorSiteConfig(AppConfig):
    name = "orchestrator_site"
    verbose_name = "prompt-orchestrator"

    def ready(self) -> None:
        # Load the Celery app in every Django process (gateway, manage.py, tests),
        # so that shared tasks are sent through it and never through a default app.
        from django.core import checks

        from orchestrator_site import celery  # noqa: F401
        from orchestrator_site.middleware import check_admin_middleware
        from orchestrator_site.telemetry import configure_tracing

        checks.register(check_admin_middleware, checks.Tags.security, deploy=False)

        # Before the first request builds the middleware chain, which tracing extends.
        configure_tracing()
