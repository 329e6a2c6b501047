"""The admin pages and management commands that operators use."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.test import Client

from orchestrator_site.errors import ApiKeyRevoked
from pipeline.auth import api_key_authenticate
from pipeline.models import ApiKey, Document, SessionTurn
from pipeline.services import sessions
from pipeline.types import PromptRequest
from tests.conftest import TenantFixture


@pytest.mark.django_db
def test_tenant_page_shows_keys_inline_without_hashes(staff: Client, owner: TenantFixture) -> None:
    page = staff.get(f"/admin/pipeline/tenant/{owner.tenant.pk}/change/").content.decode()
    assert owner.issued.api_key.prefix in page and owner.issued.api_key.key_hash not in page and owner.key not in page


@pytest.mark.django_db
def test_document_admin_searches_and_filters(staff: Client, owner: TenantFixture, outsider: TenantFixture) -> None:
    Document.objects.create(tenant=owner.tenant, title="Refund policy", body="x")
    Document.objects.create(tenant=outsider.tenant, title="Shipping", body="y")
    found = staff.get("/admin/pipeline/document/", {"q": "Refund"}).content.decode()
    assert "Refund policy" in found and "Shipping" not in found
    filtered = staff.get("/admin/pipeline/document/", {"tenant__id__exact": str(outsider.tenant.pk)}).content.decode()
    assert "Shipping" in filtered and "Refund policy" not in filtered


@pytest.mark.django_db
def test_session_turns_are_read_only_in_the_admin(staff: Client, owner: TenantFixture) -> None:
    request = PromptRequest(
        request_id="req-1", tenant_id=str(owner.tenant.id), session_id="s-1", prompt="question", worker="echo", model="echo-1", max_tokens=5
    )
    sessions.session_turns_append(request=request, reply="answer")
    turn = SessionTurn.objects.get(role="user")
    page = staff.get(f"/admin/pipeline/sessionturn/{turn.pk}/change/").content.decode()
    assert "question" in page and 'name="content"' not in page  # shown, not editable
    assert "req-1" in staff.get("/admin/pipeline/sessionturn/", {"q": "req-1"}).content.decode()


@pytest.mark.django_db
def test_anonymous_users_are_sent_to_the_admin_login(owner: TenantFixture) -> None:
    resp = Client().get("/admin/pipeline/apikey/")
    assert resp.status_code == 302 and "/admin/login/" in resp["Location"]


@pytest.mark.django_db
def test_create_tenant_prints_only_the_key() -> None:
    out = StringIO()
    call_command("create_tenant", "  spaced name  ", stdout=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and api_key_authenticate(lines[0]).tenant.name == "spaced name"


@pytest.mark.django_db
def test_create_tenant_key_name_is_recorded() -> None:
    out = StringIO()
    call_command("create_tenant", "acme", "--key-name", "ci-pipeline", stdout=out)
    assert api_key_authenticate(out.getvalue().strip()).name == "ci-pipeline"


@pytest.mark.django_db
def test_create_tenant_rotate_revokes_the_earlier_key_of_that_name() -> None:
    first, second, other = StringIO(), StringIO(), StringIO()
    call_command("create_tenant", "rotating", "--key-name", "make-run", stdout=first)
    call_command("create_tenant", "rotating", "--reuse", "--key-name", "ops", stdout=other)
    call_command("create_tenant", "rotating", "--reuse", "--rotate", "--key-name", "make-run", stdout=second)
    with pytest.raises(ApiKeyRevoked):
        api_key_authenticate(first.getvalue().strip())
    assert api_key_authenticate(second.getvalue().strip()).name == "make-run"
    assert api_key_authenticate(other.getvalue().strip()).name == "ops"  # another name's key is left alone
    assert ApiKey.objects.filter(tenant__name="rotating", revoked_at__isnull=True).count() == 2


@pytest.mark.django_db
def test_the_tenant_form_says_what_a_blank_limit_means(staff: Client) -> None:
    page = staff.get("/admin/pipeline/tenant/add/").content.decode()
    assert "Blank: the default of pipeline.toml's [rate_limits]. 0: no limit for this tenant." in page
