from __future__ import annotations

from django.urls import path

from pipeline.api import views
from pipeline.api.budgets import BudgetsApi, UsageApi
from pipeline.api.config import ConfigApi

urlpatterns = [
    path("infer", views.InferApi.as_view(), name="infer"),
    path("status/<str:request_id>", views.RequestStatusApi.as_view(), name="request-status"),
    path("result/<str:request_id>", views.RequestResultApi.as_view(), name="request-result"),
    path("documents", views.DocumentListCreateApi.as_view(), name="documents"),
    path("documents/<str:document_id>", views.DocumentDetailApi.as_view(), name="document-detail"),
    path("config", ConfigApi.as_view(), name="config"),
    path("budgets", BudgetsApi.as_view(), name="budgets"),
    path("usage", UsageApi.as_view(), name="usage"),
]
