"""Config versions in the admin (edited with the same validation, diffed against the
active version, activated or rolled back with one action) and ``GET /api/v1/config``
(staff only)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from django.contrib.messages import get_messages
from django.test import Client, override_settings

from pipeline.config.versions import version_activate, version_active, version_create
from pipeline.models import ConfigApplies, ConfigSource, PipelineConfigVersion
from tests.conftest import TenantFixture

BASE = '[workers.echo]\nkind = "echo"\n'
CHANGELIST = "/admin/pipeline/pipelineconfigversion/"
ADD = f"{CHANGELIST}add/"


@pytest.fixture
def scope() -> Iterator[str]:
    name = f"a{uuid.uuid4().hex[:10]}"
    with override_settings(PIPELINE_CONFIG_SCOPE=name):
        yield name


def messages_of(resp: object) -> list[str]:
    return [str(m) for m in get_messages(resp.wsgi_request)]  # type: ignore[attr-defined]


@pytest.mark.django_db
def test_an_invalid_edit_shows_every_problem_and_saves_nothing(staff: Client, scope: str) -> None:
    resp = staff.post(ADD, {"text": "[rag]\ntop_k = 0\ntimout_ms = 3\n", "comment": "try"})
    assert resp.status_code == 200
    page = resp.content.decode()
    assert "pipeline.toml:2: rag.top_k: 0 is too small: the least allowed is 1" in page
    assert "pipeline.toml:3: rag.timout_ms: unknown key; did you mean &quot;timeout_ms&quot;?" in page
    assert not PipelineConfigVersion.objects.filter(scope=scope).exists()


@pytest.mark.django_db
def test_a_valid_edit_is_saved_as_a_new_version_by_its_author(staff: Client, scope: str) -> None:
    resp = staff.post(ADD, {"text": BASE + "[rag]\r\ntop_k = 4\r\n", "comment": "more context"}, follow=True)
    assert resp.status_code == 200
    version = PipelineConfigVersion.objects.get(scope=scope)
    assert (version.author, version.comment, version.source, version.valid, version.is_active) == ("ops", "more context", ConfigSource.ADMIN, True, False)
    assert "\r" not in version.text
    assert any(f"Saved as version {version.id}" in m for m in messages_of(resp))


@pytest.mark.django_db
def test_the_add_form_starts_from_the_active_version_or_the_one_copied(staff: Client, scope: str) -> None:
    active = version_activate(version_id=version_create(text=BASE + "# the active one\n", source=ConfigSource.CLI).id, by="x")
    other = version_create(text=BASE + "# another\n", source=ConfigSource.CLI)
    assert "# the active one" in staff.get(ADD).content.decode()
    assert "# another" in staff.get(f"{ADD}?copy_from={other.id}").content.decode()
    assert active.id != other.id


@pytest.mark.django_db
def test_a_version_page_shows_its_diff_against_the_active_one(staff: Client, scope: str) -> None:
    active = version_activate(version_id=version_create(text=BASE, source=ConfigSource.CLI).id, by="x")
    other = version_create(text=BASE + "[rag]\ntop_k = 4\n", source=ConfigSource.CLI)
    page = staff.get(f"{CHANGELIST}{other.id}/change/").content.decode()
    assert f"--- version {active.id} (active)" in page and "+top_k = 4" in page
    assert "(this is the active version, or there is none)" in staff.get(f"{CHANGELIST}{active.id}/change/").content.decode()


@pytest.mark.django_db
def test_one_action_activates_and_another_rolls_back(staff: Client, scope: str) -> None:
    first = version_activate(version_id=version_create(text=BASE, source=ConfigSource.CLI).id, by="x")
    second = version_create(text=BASE + "[rag]\ntop_k = 4\n", source=ConfigSource.CLI)
    resp = staff.post(CHANGELIST, {"action": "activate_live", "_selected_action": [second.id]}, follow=True)
    assert version_active().id == second.id  # type: ignore[union-attr]
    assert f"Version {second.id} is active: it applies in every process within a second." in messages_of(resp)
    staff.post(CHANGELIST, {"action": "activate_live", "_selected_action": [first.id]})
    active = version_active()
    assert active is not None and active.id == first.id and active.activated_by == "ops"


@pytest.mark.django_db
def test_a_breaking_version_is_refused_live_with_its_reasons_and_taken_at_restart(staff: Client, scope: str) -> None:
    version_activate(version_id=version_create(text=BASE, source=ConfigSource.CLI).id, by="x")
    breaking = version_create(text=BASE + "[queues]\nbatch_concurrency = 6\n", source=ConfigSource.CLI)
    resp = staff.post(CHANGELIST, {"action": "activate_live", "_selected_action": [breaking.id]}, follow=True)
    assert any("queues.batch_concurrency: 2 → 6: read when a process starts" in m for m in messages_of(resp))
    assert version_active().id != breaking.id  # type: ignore[union-attr]
    resp = staff.post(CHANGELIST, {"action": "activate_at_restart", "_selected_action": [breaking.id]}, follow=True)
    active = version_active()
    assert active is not None and active.id == breaking.id and active.applies == ConfigApplies.AT_RESTART
    assert f"Version {breaking.id} is active: it applies when each process restarts." in messages_of(resp)


@pytest.mark.django_db
def test_activation_takes_exactly_one_version_and_refuses_an_invalid_one(staff: Client, scope: str) -> None:
    a, b = (version_create(text=BASE + f"# {n}\n", source=ConfigSource.CLI) for n in (1, 2))
    resp = staff.post(CHANGELIST, {"action": "activate_live", "_selected_action": [a.id, b.id]}, follow=True)
    assert "Select exactly one version to activate." in messages_of(resp) and version_active() is None
    bad = version_create(text="[rag]\ntop_k = 0\n", source=ConfigSource.FILE)
    resp = staff.post(CHANGELIST, {"action": "activate_live", "_selected_action": [bad.id]}, follow=True)
    assert any("rag.top_k: 0 is too small" in m for m in messages_of(resp)) and version_active() is None


@pytest.mark.django_db
def test_the_list_shows_the_scope_versions_with_their_pipeline_and_no_delete(staff: Client, scope: str) -> None:
    mine = version_create(text='[pipeline]\nname = "prod-eu"\n' + BASE, source=ConfigSource.CLI)
    bad = version_create(text="[rag]\ntop_k = 0\n", source=ConfigSource.FILE)
    with override_settings(PIPELINE_CONFIG_SCOPE="other-scope"):
        theirs = version_create(text=BASE, source=ConfigSource.CLI)
    page = staff.get(CHANGELIST).content.decode()
    assert "prod-eu" in page and "(invalid)" in page and f"/{mine.id}/change/" in page and f"/{bad.id}/change/" in page
    assert f"/{theirs.id}/change/" not in page
    assert staff.get(f"{CHANGELIST}{mine.id}/delete/").status_code == 403
    assert "pipeline.toml:2: rag.top_k: 0 is too small" in staff.get(f"{CHANGELIST}{bad.id}/change/").content.decode()


@pytest.mark.django_db
def test_the_config_api_shows_the_active_version_to_staff(staff: Client, scope: str) -> None:
    active = version_activate(
        version_id=version_create(text='[pipeline]\nname = "api"\n' + BASE, source=ConfigSource.CLI, author="ada", comment="c").id, by="ops"
    )
    body = staff.get("/api/v1/config").json()
    assert body["scope"] == scope and body["process"]["version"] == 0
    assert {k: body["active"][k] for k in ("version", "applies", "activated_by", "source", "author", "comment")} == {
        "version": active.id,
        "applies": "live",
        "activated_by": "ops",
        "source": "cli",
        "author": "ada",
        "comment": "c",
    }
    assert body["active"]["settings"]["pipeline"]["name"] == "api" and body["active"]["text"].startswith("[pipeline]")


@pytest.mark.django_db
def test_the_config_api_with_no_active_version(staff: Client, scope: str) -> None:
    resp = staff.get("/api/v1/config")
    assert resp.json()["active"] is None


@pytest.mark.django_db
def test_the_config_api_refuses_anyone_but_staff(owner: TenantFixture, scope: str) -> None:
    from django.contrib.auth.models import User

    anonymous = Client().get("/api/v1/config")
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "authentication_failed"
    tenant = owner.client.get("/api/v1/config")  # a tenant's API key is not a staff session
    assert tenant.status_code == 401
    User.objects.create_user("plain", password="pw-only-for-tests")
    client = Client()
    client.login(username="plain", password="pw-only-for-tests")
    assert client.get("/api/v1/config").status_code == 401
