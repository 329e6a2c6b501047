"""A tenant's ``has_documents``: kept with its documents, read with its cached key, and
a request of a tenant with none skips the RAG search (which would find nothing)."""

from __future__ import annotations

import pytest

from pipeline.auth import api_key_authenticate_cached, key_cache
from pipeline.config import get_config
from pipeline.models import Document, Tenant
from pipeline.services import documents, start
from pipeline.stages.context import StageContext
from pipeline.stages.rag import RetrievalResult, rag
from pipeline.tokenbus import get_bus
from tests.conftest import TenantFixture, run_in_process


def has_documents(tenant: TenantFixture) -> bool:
    return Tenant.objects.get(pk=tenant.tenant.pk).has_documents


@pytest.mark.django_db
def test_the_flag_follows_the_documents(owner: TenantFixture, outsider: TenantFixture) -> None:
    assert not has_documents(owner)
    first = documents.document_create(tenant=owner.tenant, title="a", body="x")
    second = documents.document_create(tenant=owner.tenant, title="b", body="y")
    assert has_documents(owner) and not has_documents(outsider)
    documents.document_delete(tenant_id=str(owner.tenant.id), document_id=str(first.id))
    assert has_documents(owner)  # one left
    documents.document_delete(tenant_id=str(owner.tenant.id), document_id=str(second.id))
    assert not has_documents(owner)


@pytest.mark.django_db
def test_a_bulk_write_is_told_after_its_commit(owner: TenantFixture) -> None:
    Document.objects.bulk_create([Document(tenant=owner.tenant, title="bulk", body="z")])
    assert not has_documents(owner)  # bulk_create sends no signal
    documents.tenant_documents_changed(tenant_id=str(owner.tenant.id))
    assert has_documents(owner)


@pytest.mark.django_db
def test_this_gateways_cached_key_sees_a_new_document_at_once(owner: TenantFixture) -> None:
    assert api_key_authenticate_cached(owner.key).tenant.has_documents is False  # cached now
    documents.document_create(tenant=owner.tenant, title="new", body="doc")
    assert key_cache.get(owner.key) is None and api_key_authenticate_cached(owner.key).tenant.has_documents is True


def test_the_rag_stage_skips_the_search_of_a_tenant_without_documents() -> None:
    from pipeline.config import RagConfig
    from pipeline.types import PromptRequest

    asked: list[dict] = []

    def retrieve(**args: object) -> RetrievalResult:
        asked.append(args)
        return RetrievalResult(documents=())

    request = PromptRequest(request_id="r", tenant_id="t", session_id="s", prompt="p", worker="echo", model="echo-1", max_tokens=5, tenant_has_documents=False)
    assert rag(StageContext(request), retrieve=retrieve, config=RagConfig()).rag_outcome == "no_documents" and asked == []
    searched = rag(StageContext(request.__class__(**{**request.__dict__, "tenant_has_documents": True})), retrieve=retrieve, config=RagConfig())
    assert searched.rag_outcome == "miss" and len(asked) == 1


@pytest.mark.django_db(transaction=True)
def test_a_request_carries_the_flag_to_the_worker(owner: TenantFixture) -> None:
    documents.document_create(tenant=owner.tenant, title="Refund policy", body="refunds within 30 days")
    for has in (False, True):
        request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "refund"}, config=get_config(), tenant_has_documents=has)
        assert type(request).from_dict(request.to_dict()).tenant_has_documents is has
        run_in_process(request)
        done = get_bus().read_all(request.request_id)[-1]
        assert done.type == "done" and "Refund policy" not in done.data["text"]  # the answer, not the context
        assert [s["title"] for s in done.data["sources"]] == (["Refund policy"] if has else [])  # searched only when it has documents
    assert owner.client.post("/api/v1/documents", {"title": "t", "body": "b"}, format="json").status_code == 201
