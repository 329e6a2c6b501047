"""``manage.py check`` (and every process start) validates pipeline.toml, so a typo
fails the deploy with a clear message instead of the first request."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, register

from orchestrator_site.errors import ConfigInvalid
from pipeline.config import load_config


@register()
def pipeline_config_check(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    try:
        load_config(settings.PIPELINE_CONFIG_PATH)
    except ConfigInvalid as exc:
        return [
            Error(
                exc.message,
                hint="`orchestrator validate FILE` shows the same; pipeline.example.toml sets every key, docs/configuration.md says what each means.",
                id="pipeline.E001",
            )
        ]
    return []
