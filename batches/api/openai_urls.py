"""OpenAI's Files and Batch APIs, under ``/v1/`` beside its chat completions."""

from __future__ import annotations

from django.urls import path

from batches.api import openai_views as views

urlpatterns = [
    path("files", views.FilesApi.as_view(), name="openai-files"),
    path("files/<str:file_id>", views.FileDetailApi.as_view(), name="openai-file"),
    path("files/<str:file_id>/content", views.FileContentApi.as_view(), name="openai-file-content"),
    path("batches", views.BatchesApi.as_view(), name="openai-batches"),
    path("batches/<str:batch_id>", views.BatchDetailApi.as_view(), name="openai-batch"),
    path("batches/<str:batch_id>/cancel", views.BatchCancelApi.as_view(), name="openai-batch-cancel"),
]
