"""A tenant's RAG documents: the writes, and the tenant's ``has_documents`` with them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db.models import Exists, OuterRef

from pipeline import selectors
from pipeline.auth import key_cache
from pipeline.models import Document, Tenant


def document_create(*, tenant: Tenant, title: str, body: str, metadata: Mapping[str, Any] | None = None) -> Document:
    document = Document.objects.create(tenant=tenant, title=title, body=body, metadata=dict(metadata or {}))
    tenant_documents_changed(tenant_id=str(tenant.pk))
    return document


def document_delete(*, tenant_id: str, document_id: str) -> None:
    selectors.document_get_for_tenant(tenant_id=tenant_id, document_id=document_id).delete()
    tenant_documents_changed(tenant_id=tenant_id)


def tenant_documents_changed(*, tenant_id: str) -> None:
    """The tenant's ``has_documents``, from its documents now: one UPDATE whose subquery
    sees every committed document (a create and a delete at once cannot leave it wrong:
    whichever updates last sees both). Gateways read it with their cached keys: this
    one at once (its cache is cleared), every other within ``API_KEY_CACHE_S``.
    Code that writes documents in bulk (``bulk_create`` sends no signal) calls it after."""
    Tenant.objects.filter(pk=tenant_id).update(has_documents=Exists(Document.objects.filter(tenant=OuterRef("pk"))))
    key_cache.clear()
