"""RAG retrieval and session history against the real Postgres, tenant by tenant."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from orchestrator_site.errors import NotFound
from pipeline import selectors
from pipeline.models import Document, SessionTurn
from pipeline.services import documents, sessions
from pipeline.types import PromptRequest
from tests.conftest import TenantFixture


def search(tenant: TenantFixture, query: str, top_k: int = 3, timeout_ms: int = 2000) -> list[str]:
    result = selectors.document_search(tenant_id=str(tenant.tenant.id), query=query, top_k=top_k, timeout_ms=timeout_ms, text_search_config="english")
    assert not result.timed_out
    return [d.title for d in result.documents]


@pytest.fixture
def library(owner: TenantFixture, outsider: TenantFixture) -> None:
    for title, body in [
        ("Refund policy", "Customers may request a refund within 30 days of purchase."),
        ("Shipping", "Orders ship within two business days. Refund shipping costs are not covered."),
        ("Careers", "We are hiring engineers in Lisbon."),
    ]:
        documents.document_create(tenant=owner.tenant, title=title, body=body)
    documents.document_create(tenant=outsider.tenant, title="Outsider refund secrets", body="refund refund refund policy purchase")


@pytest.mark.django_db
def test_most_relevant_documents_first(owner: TenantFixture, library: None) -> None:
    assert search(owner, "how do I get a refund for my purchase?") == ["Refund policy", "Shipping"]


@pytest.mark.django_db
def test_title_matches_weigh_more_than_body_matches(owner: TenantFixture, library: None) -> None:
    assert search(owner, "shipping")[0] == "Shipping"


@pytest.mark.django_db
def test_never_another_tenants_documents(owner: TenantFixture, outsider: TenantFixture, library: None) -> None:
    assert "Outsider refund secrets" not in search(owner, "refund policy purchase secrets")
    assert search(outsider, "refund") == ["Outsider refund secrets"]


@pytest.mark.django_db
def test_top_k_and_no_match(owner: TenantFixture, library: None) -> None:
    assert len(search(owner, "refund", top_k=1)) == 1
    assert search(owner, "quantum chromodynamics") == []
    assert search(owner, "the of and") == []  # only stop words: no lexemes, no error


@pytest.mark.django_db
def test_search_vector_is_maintained_by_postgres(owner: TenantFixture) -> None:
    doc = documents.document_create(tenant=owner.tenant, title="Alpha", body="zebra")
    assert search(owner, "zebra") == ["Alpha"]
    Document.objects.filter(pk=doc.pk).update(body="giraffe")
    assert search(owner, "giraffe") == ["Alpha"] and search(owner, "zebra") == []


def slow_search(tenant: TenantFixture) -> selectors.RetrievalResult:
    """A search over 20,000 matching documents with a 1 ms timeout: cancelled, reported
    as timed out with no documents."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO pipeline_document (id, tenant_id, title, body, metadata, created_at) "
            "SELECT gen_random_uuid(), %s, 'refund ' || g, repeat('refund policy purchase words ', 40), '{}', now() FROM generate_series(1, 20000) g",
            [tenant.tenant.id],
        )
    result = selectors.document_search(tenant_id=str(tenant.tenant.id), query="refund policy purchase", top_k=3, timeout_ms=1, text_search_config="english")
    assert result.documents == ()
    return result


def statement_timeout() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SHOW statement_timeout")
        return str(cursor.fetchone()[0])


@pytest.mark.django_db
def test_slow_search_times_out_and_reports_it(owner: TenantFixture) -> None:
    assert slow_search(owner).timed_out
    # The timeout was local to that search: the connection still works without it.
    assert search(owner, "refund", top_k=1, timeout_ms=60_000)


@pytest.mark.django_db
def test_inside_a_transaction_the_search_timeout_ends_with_the_search(owner: TenantFixture) -> None:
    """A search inside a caller's transaction (a test's, a batch chunk's) leaves the
    transaction's later statements without its timeout, found or cancelled."""
    documents.document_create(tenant=owner.tenant, title="Refund policy", body="refund within 30 days")
    assert connection.in_atomic_block and statement_timeout() == "0"
    assert search(owner, "refund", timeout_ms=1500) == ["Refund policy"]
    assert statement_timeout() == "0"
    assert slow_search(owner).timed_out
    assert statement_timeout() == "0"


@pytest.mark.django_db(transaction=True)
def test_outside_a_transaction_the_timed_search_is_one_round_trip_and_its_timeout_ends_with_it(owner: TenantFixture) -> None:
    """A worker's case (autocommit): the timeout and the search are one string, one
    implicit transaction. The timeout still cancels a slow search, and does not stay
    on the connection after it, cancelled or not."""
    documents.document_create(tenant=owner.tenant, title="Refund policy", body="refund within 30 days")
    with CaptureQueriesContext(connection) as queries:
        assert search(owner, "refund", timeout_ms=1500) == ["Refund policy"]
    assert len(queries.captured_queries) == 1 and not connection.in_atomic_block
    assert statement_timeout() == "0"
    assert slow_search(owner).timed_out
    assert statement_timeout() == "0"


@pytest.mark.django_db
def test_document_get_and_list_are_tenant_scoped(owner: TenantFixture, outsider: TenantFixture) -> None:
    doc = documents.document_create(tenant=owner.tenant, title="Mine", body="x", metadata={"k": 1})
    assert selectors.document_get_for_tenant(tenant_id=str(owner.tenant.id), document_id=str(doc.id)) == doc
    with pytest.raises(NotFound):
        selectors.document_get_for_tenant(tenant_id=str(outsider.tenant.id), document_id=str(doc.id))
    with pytest.raises(NotFound):
        selectors.document_get_for_tenant(tenant_id=str(owner.tenant.id), document_id="not-a-uuid")
    assert list(selectors.documents_of_tenant(tenant_id=str(outsider.tenant.id))) == []
    assert [d.title for d in selectors.documents_of_tenant(tenant_id=str(owner.tenant.id))] == ["Mine"]


def request(tenant: TenantFixture, session: str, prompt: str, n: int) -> PromptRequest:
    return PromptRequest(
        request_id=f"r{n}-{tenant.tenant.name}", tenant_id=str(tenant.tenant.id), session_id=session, prompt=prompt, worker="echo", model="echo-1", max_tokens=5
    )


@pytest.mark.django_db
def test_session_history_is_chronological_and_bounded(owner: TenantFixture) -> None:
    for n in range(5):
        sessions.session_turns_append(request=request(owner, "s1", f"q{n}", n), reply=f"a{n}")
    sessions.session_turns_append(request=request(owner, "s2", "other", 9), reply="x")
    history = selectors.session_history(tenant_id=str(owner.tenant.id), session_id="s1", turns=2)
    assert [(m.role, m.content) for m in history] == [("user", "q3"), ("assistant", "a3"), ("user", "q4"), ("assistant", "a4")]
    assert selectors.session_history(tenant_id=str(owner.tenant.id), session_id="s1", turns=0) == ()
    assert SessionTurn.objects.filter(session_id="s1").count() == 10


@pytest.mark.django_db(transaction=True)
def test_a_prompt_and_its_reply_are_stored_by_one_statement_in_order(owner: TenantFixture) -> None:
    with CaptureQueriesContext(connection) as queries:
        sessions.session_turns_append(request=request(owner, "one", "question", 1), reply="answer")
    assert len(queries.captured_queries) == 1  # no BEGIN/COMMIT around it: one INSERT is atomic
    turns = list(SessionTurn.objects.filter(session_id="one").order_by("id").values_list("role", "content", "request_id", "tenant_id"))
    assert turns == [("user", "question", "r1-owner", owner.tenant.id), ("assistant", "answer", "r1-owner", owner.tenant.id)]
    assert SessionTurn.objects.get(role="user", session_id="one").created_at is not None


@pytest.mark.django_db
def test_session_history_never_crosses_tenants(owner: TenantFixture, outsider: TenantFixture) -> None:
    sessions.session_turns_append(request=request(owner, "shared-id", "owner secret", 1), reply="r")
    assert selectors.session_history(tenant_id=str(outsider.tenant.id), session_id="shared-id", turns=5) == ()


@pytest.mark.django_db
def test_document_delete_is_tenant_scoped(owner: TenantFixture, outsider: TenantFixture) -> None:
    doc = documents.document_create(tenant=owner.tenant, title="Mine", body="x")
    with pytest.raises(NotFound):
        documents.document_delete(tenant_id=str(outsider.tenant.id), document_id=str(doc.id))
    documents.document_delete(tenant_id=str(owner.tenant.id), document_id=str(doc.id))
    assert not Document.objects.filter(pk=doc.pk).exists()


@pytest.mark.django_db
def test_document_list_pages_newest_first(owner: TenantFixture) -> None:
    for i in range(7):
        documents.document_create(tenant=owner.tenant, title=f"d{i}", body="x")
    tenant_id = str(owner.tenant.id)
    pages = [[d.title for d in selectors.documents_of_tenant(tenant_id=tenant_id)[o : o + 3]] for o in (0, 3, 6, 9)]
    assert pages == [["d6", "d5", "d4"], ["d3", "d2", "d1"], ["d0"], []]
    envelope = owner.client.get("/api/v1/documents?limit=3&offset=3").json()
    assert envelope["count"] == 7 and [d["title"] for d in envelope["results"]] == ["d3", "d2", "d1"]
    assert envelope["next"].endswith("/api/v1/documents?limit=3&offset=6") and envelope["previous"].endswith("/api/v1/documents?limit=3")
    last = owner.client.get("/api/v1/documents?limit=3&offset=6").json()
    assert last["next"] is None and [d["title"] for d in last["results"]] == ["d0"]


@pytest.mark.django_db
def test_metadata_is_stored_as_json(owner: TenantFixture) -> None:
    doc = documents.document_create(tenant=owner.tenant, title="m", body="b", metadata={"source": "faq", "tags": ["a", "b"], "n": 1})
    assert Document.objects.get(pk=doc.pk).metadata == {"source": "faq", "tags": ["a", "b"], "n": 1}
    assert documents.document_create(tenant=owner.tenant, title="n", body="b").metadata == {}


@pytest.mark.django_db
def test_a_request_has_one_pair_of_turns_the_latest_attempts(owner: TenantFixture) -> None:
    asked = request(owner, "s1", "question", 1)
    assert sessions.session_turns_append(request=asked, reply="from attempt 2", attempt=2)
    assert sessions.session_turns_append(request=asked, reply="from attempt 1, late", attempt=1)  # never replaces a later one
    assert sessions.session_turns_append(request=asked, reply="from attempt 2, again", attempt=2)  # nor an equal one
    turns = SessionTurn.objects.filter(request_id=asked.request_id)
    assert sorted(turns.values_list("role", "content", "attempt")) == [("assistant", "from attempt 2", 2), ("user", "question", 2)]
    assert sessions.session_turns_append(request=asked, reply="from attempt 3", attempt=3)
    assert turns.get(role="assistant").content == "from attempt 3" and turns.count() == 2


@pytest.mark.django_db(transaction=True)
def test_turns_postgres_refuses_are_logged_not_raised(owner: TenantFixture) -> None:
    # A session id longer than the column: Postgres itself refuses the row.
    assert sessions.session_turns_append(request=request(owner, "s" * 200, "q", 1), reply="a") is False
    assert SessionTurn.objects.count() == 0
