from __future__ import annotations

from django.contrib import admin
from django.urls import include, path, re_path
from django.views.decorators.clickjacking import xframe_options_deny
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from orchestrator_site.health import health_view
from orchestrator_site.metrics import metrics_view
from pipeline.api.errors import not_found_view
from pipeline.api.openai_compat import ChatCompletionsApi, ModelsApi
from pipeline.playground import playground_view

urlpatterns = [
    path("health", health_view, name="health"),
    path("metrics", metrics_view, name="metrics"),
    path("playground", playground_view, name="playground"),
    path("api/v1/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/v1/docs/", xframe_options_deny(SpectacularSwaggerView.as_view(url_name="schema")), name="docs"),
    path("api/v1/", include("batches.api.urls")),
    path("api/v1/", include("pipeline.api.urls")),
    # The OpenAI-compatible API, where the openai SDK looks for it (base_url=<gateway>/v1).
    path("v1/models", ModelsApi.as_view(), name="openai-models"),
    path("v1/chat/completions", ChatCompletionsApi.as_view(), name="openai-chat-completions"),
    path("v1/", include("batches.api.openai_urls")),
    re_path(r"^v1/", not_found_view),
    # API clients get the JSON error even when DEBUG would render an HTML 404 page.
    re_path(r"^api/", not_found_view),
    path("admin/", admin.site.urls),
]

handler404 = "pipeline.api.errors.not_found_view"
handler500 = "pipeline.api.errors.server_error_view"
