"""POST/GET/DELETE /api/v1/documents: the owner sees its documents, the outsider gets 404."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from tests.conftest import TenantFixture

DOCS = "/api/v1/documents"


def create(tenant: TenantFixture, title: str = "Refunds", body: str = "Within 30 days.") -> dict:
    resp = tenant.client.post(DOCS, {"title": title, "body": body, "metadata": {"source": "faq"}}, format="json")
    assert resp.status_code == 201, resp.content
    return resp.json()


@pytest.mark.django_db
def test_create_returns_the_document(owner: TenantFixture) -> None:
    doc = create(owner)
    assert set(doc) == {"id", "title", "body", "metadata", "created_at"}
    assert doc["title"] == "Refunds" and doc["metadata"] == {"source": "faq"}


@pytest.mark.django_db
def test_list_get_delete(owner: TenantFixture) -> None:
    first, second = create(owner, "A"), create(owner, "B")
    listed = owner.client.get(DOCS).json()
    assert [d["title"] for d in listed["results"]] == ["B", "A"] and listed["count"] == 2 and listed["next"] is None
    assert [d["title"] for d in owner.client.get(DOCS, {"limit": 1, "offset": 1}).json()["results"]] == ["A"]
    assert owner.client.get(f"{DOCS}/{first['id']}").json()["title"] == "A"
    assert owner.client.delete(f"{DOCS}/{second['id']}").status_code == 204
    assert owner.client.get(f"{DOCS}/{second['id']}").status_code == 404


@pytest.mark.django_db
def test_outsider_gets_404_on_every_document_operation(owner: TenantFixture, outsider: TenantFixture) -> None:
    doc = create(owner)
    for resp in (outsider.client.get(f"{DOCS}/{doc['id']}"), outsider.client.delete(f"{DOCS}/{doc['id']}")):
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    assert outsider.client.get(DOCS).json() == {"count": 0, "next": None, "previous": None, "results": []}
    assert owner.client.get(f"{DOCS}/{doc['id']}").status_code == 200  # still there


@pytest.mark.django_db
def test_malformed_ids_are_404(owner: TenantFixture) -> None:
    assert owner.client.get(f"{DOCS}/not-a-uuid").status_code == 404


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"body": "x"}, "title"),
        ({"title": "x"}, "body"),
        ({"title": "", "body": "x"}, "title"),
        ({"title": "t" * 301, "body": "x"}, "title"),
        ({"title": "t", "body": "nul\u0000"}, "body"),
        ({"title": "t", "body": "b", "metadata": "x"}, "metadata"),
    ],
)
def test_invalid_documents(owner: TenantFixture, body: dict, field: str) -> None:
    resp = owner.client.post(DOCS, body, format="json")
    assert resp.status_code == 400 and list(resp.json()["error"]["data"]["fields"]) == [field]


@pytest.mark.django_db
@pytest.mark.parametrize("query", [{"limit": "x"}, {"offset": "1.5"}, {"limit": 0}, {"offset": -5}, {"limit": "-1"}])
def test_bad_paging(owner: TenantFixture, query: dict) -> None:
    resp = owner.client.get(DOCS, query)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_request"
    assert resp.json()["error"]["data"] == {"field": next(iter(query))}


@pytest.mark.django_db
def test_a_page_is_at_most_500(owner: TenantFixture) -> None:
    create(owner)
    page = owner.client.get(DOCS, {"limit": 100_000}).json()
    assert page["count"] == 1 and len(page["results"]) == 1 and page["next"] is None


@pytest.mark.django_db
def test_documents_need_a_key(anon: APIClient) -> None:
    assert anon.get(DOCS).status_code == 401
    assert anon.post(DOCS, {"title": "t", "body": "b"}, format="json").status_code == 401
