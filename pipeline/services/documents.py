"""A tenant's RAG documents: the writes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline import selectors
from pipeline.models import Document, Tenant


def document_create(*, tenant: Tenant, title: str, body: str, metadata: Mapping[str, Any] | None = None) -> Document:
    return Document.objects.create(tenant=tenant, title=title, body=body, metadata=dict(metadata or {}))


def document_delete(*, tenant_id: str, document_id: str) -> None:
    selectors.document_get_for_tenant(tenant_id=tenant_id, document_id=document_id).delete()
