"""Whatever a user types, the full-text search neither fails nor leaks."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import selectors
from pipeline.services import documents
from tests.conftest import TenantFixture


@pytest.mark.django_db
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=60))
def test_any_query_text_is_safe(owner: TenantFixture, query: str) -> None:
    result = selectors.document_search(tenant_id=str(owner.tenant.id), query=query, top_k=3, timeout_ms=2000, text_search_config="english")
    assert not result.timed_out and len(result.documents) <= 3


@pytest.mark.django_db
@pytest.mark.parametrize(
    "query", ["refund & !policy", "refund | policy", "'refund'", "refund:*", "(refund", "refund <-> policy", "\\refund", "REFUND!!!", "refunds"]
)
def test_tsquery_syntax_in_prompts_is_plain_text(owner: TenantFixture, query: str) -> None:
    documents.document_create(tenant=owner.tenant, title="Refund policy", body="Refunds within 30 days")
    result = selectors.document_search(tenant_id=str(owner.tenant.id), query=query, top_k=3, timeout_ms=2000, text_search_config="english")
    assert [d.title for d in result.documents] == ["Refund policy"]


@pytest.mark.django_db
def test_other_languages_and_configs(owner: TenantFixture) -> None:
    documents.document_create(tenant=owner.tenant, title="Rückerstattung", body="Erstattungen innerhalb von 30 Tagen")
    found = selectors.document_search(tenant_id=str(owner.tenant.id), query="Erstattungen", top_k=3, timeout_ms=2000, text_search_config="english")
    assert [d.title for d in found.documents] == ["Rückerstattung"]
    simple = selectors.document_search(tenant_id=str(owner.tenant.id), query="Erstattungen", top_k=3, timeout_ms=2000, text_search_config="simple")
    assert simple.timed_out is False


@pytest.mark.django_db
def test_ranks_are_descending(owner: TenantFixture) -> None:
    documents.document_create(tenant=owner.tenant, title="Refund", body="refund refund refund policy")
    documents.document_create(tenant=owner.tenant, title="Other", body="one refund mention among many other words here")
    ranks = [
        d.rank
        for d in selectors.document_search(
            tenant_id=str(owner.tenant.id), query="refund policy", top_k=5, timeout_ms=2000, text_search_config="english"
        ).documents
    ]
    assert ranks == sorted(ranks, reverse=True) and len(ranks) == 2
