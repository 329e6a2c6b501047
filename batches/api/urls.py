from __future__ import annotations

from django.urls import path

from batches.api import views

urlpatterns = [
    path("batch", views.BatchListCreateApi.as_view(), name="batches"),
    path("batch/webhook-secret", views.BatchWebhookSecretApi.as_view(), name="batch-webhook-secret"),
    path("batch/<uuid:job_id>", views.BatchDetailApi.as_view(), name="batch-detail"),
    path("batch/<uuid:job_id>/cancel", views.BatchCancelApi.as_view(), name="batch-cancel"),
    path("batch/<uuid:job_id>/results", views.BatchResultsApi.as_view(), name="batch-results"),
]
