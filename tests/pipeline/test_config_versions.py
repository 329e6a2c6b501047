"""Config versions in Postgres: stored validated, one active per scope, activation
refused when it needs a restart, the file imported when it changes (and an admin's
later activation kept), and each request or batch job pinned to its version."""

from __future__ import annotations

import json
import select
import uuid
from pathlib import Path

import psycopg
import pytest
from django.test import override_settings
from structlog.testing import capture_logs

from orchestrator_site.errors import ConfigInvalid, ConfigNeedsRestart, NotFound
from pipeline.config import PipelineSettings, config_at, config_version, parse_config, set_config
from pipeline.config.reload import connection_params
from pipeline.config.versions import (
    CHANNEL,
    breaking_changes,
    diff_against_active,
    history,
    import_file,
    register_worker_usage,
    settings_of,
    stored_settings,
    version_activate,
    version_active,
    version_create,
    version_get,
    workers_in_use,
)
from pipeline.models import ConfigApplies, ConfigSource, PipelineConfigVersion

BASE = '[workers.echo]\nkind = "echo"\n[workers.spare]\nkind = "echo"\n'


@pytest.fixture
def scope() -> str:
    name = f"t{uuid.uuid4().hex[:10]}"
    with override_settings(PIPELINE_CONFIG_SCOPE=name):
        yield name


def create(text: str = BASE, source: ConfigSource = ConfigSource.CLI, comment: str = "") -> PipelineConfigVersion:
    return version_create(text=text, source=source, author="ada", comment=comment)


@pytest.mark.django_db
def test_a_valid_text_is_stored_with_its_digest_and_no_problems(scope: str) -> None:
    version = create(comment="first")
    stored = PipelineConfigVersion.objects.get(id=version.id)
    assert (stored.scope, stored.valid, stored.problems, stored.author, stored.comment, stored.is_active) == (scope, True, [], "ada", "first", False)
    assert len(stored.digest) == 64 and stored.source == ConfigSource.CLI


@pytest.mark.django_db
@pytest.mark.parametrize("source", [ConfigSource.CLI, ConfigSource.ADMIN])
def test_an_invalid_text_from_a_person_is_refused_and_not_stored(scope: str, source: ConfigSource) -> None:
    with pytest.raises(ConfigInvalid) as info:
        create("[rag]\ntop_k = 0\n", source=source)
    assert info.value.data["problems"] == [{"path": "rag.top_k", "message": "0 is too small: the least allowed is 1", "line": 2}]
    assert not PipelineConfigVersion.objects.filter(scope=scope).exists()


@pytest.mark.django_db
def test_an_invalid_file_is_stored_as_invalid_and_cannot_be_activated(scope: str) -> None:
    version = create("[rag]\ntop_k = 0\n", source=ConfigSource.FILE)
    assert not version.valid and version.problems[0]["path"] == "rag.top_k"
    with pytest.raises(ConfigInvalid, match=r"version \d+:2: rag.top_k: 0 is too small"):
        version_activate(version_id=version.id, by="ada")


@pytest.mark.django_db
def test_activation_leaves_one_active_version_per_scope(scope: str) -> None:
    first, second = create(), create(BASE + "[rag]\ntop_k = 5\n")
    version_activate(version_id=first.id, by="ada")
    version_activate(version_id=second.id, by="bob")
    active = version_active()
    assert active is not None and active.id == second.id and active.activated_by == "bob" and active.applies == ConfigApplies.LIVE
    assert list(PipelineConfigVersion.objects.filter(scope=scope, is_active=True).values_list("id", flat=True)) == [second.id]
    version_activate(version_id=first.id, by="ada")  # a rollback
    assert version_active().id == first.id  # type: ignore[union-attr]


@pytest.mark.django_db
def test_activating_the_active_version_again_changes_nothing(scope: str) -> None:
    version = create()
    first = version_activate(version_id=version.id, by="ada")
    again = version_activate(version_id=version.id, by="bob")
    assert again.activated_by == "ada" and again.activated_at == first.activated_at


@pytest.mark.django_db
def test_a_version_of_another_scope_is_not_found(scope: str) -> None:
    version = create()
    with override_settings(PIPELINE_CONFIG_SCOPE="elsewhere"), pytest.raises(NotFound):
        version_activate(version_id=version.id, by="ada")
    with pytest.raises(NotFound):
        version_get(version_id=version.id + 10_000)


@pytest.mark.django_db
def test_a_queue_bound_change_needs_a_restart_and_may_be_activated_at_restart(scope: str) -> None:
    version_activate(version_id=create().id, by="ada")
    bounded = create(BASE + "[queues]\nrealtime_concurrency = 8\npublish_threads = 2\n")
    with pytest.raises(ConfigNeedsRestart) as info:
        version_activate(version_id=bounded.id, by="ada")
    assert info.value.data["changes"] == [
        "queues.realtime_concurrency: 32 → 8: read when a process starts (the queue topology and its bounds)",
        "queues.publish_threads: 4 → 2: read when a process starts (the queue topology and its bounds)",
    ]
    assert info.value.message.startswith(f"version {bounded.id} cannot apply to running processes: queues.realtime_concurrency: 32 → 8")
    assert info.value.message.endswith("Activate it at restart, then restart every process.")
    version_activate(version_id=bounded.id, by="ada", at_restart=True)
    assert version_active().applies == ConfigApplies.AT_RESTART  # type: ignore[union-attr]


@pytest.mark.django_db
def test_the_first_activation_of_a_scope_is_never_breaking(scope: str) -> None:
    version = version_activate(version_id=create(BASE + "[queues]\nbatch_concurrency = 9\n").id, by="ada")
    assert version.is_active and version.applies == ConfigApplies.LIVE


def test_removing_or_rekinding_a_worker_breaks_only_while_it_is_in_use() -> None:
    old = parse_config(BASE + '[workers.gpt]\nkind = "openai"\nbase_url = "http://x"\n', source="old")
    removed = parse_config(BASE, source="removed")
    rekinded = parse_config(BASE + '[workers.gpt]\nkind = "anthropic"\nbase_url = "http://x"\n', source="rekinded")
    assert breaking_changes(old, removed, in_use=set()) == []
    assert breaking_changes(old, removed, in_use={"gpt"}) == ["workers.gpt: removed while requests or batch jobs use it"]
    assert breaking_changes(old, rekinded, in_use={"gpt", "echo"}) == ["workers.gpt.kind: openai → anthropic while requests or batch jobs use it"]
    assert breaking_changes(old, parse_config(BASE + '[workers.gpt]\nkind = "openai"\nbase_url = "http://y"\n', source="moved"), in_use={"gpt"}) == []


@pytest.mark.django_db
def test_a_worker_that_an_active_batch_job_uses_cannot_be_removed_live(scope: str, owner: object) -> None:
    from batches.models import BatchJob

    version_activate(version_id=create().id, by="ada")
    BatchJob.objects.create(tenant=owner.tenant, worker="spare", model="m", max_tokens=5, items_total=1)  # type: ignore[attr-defined]
    assert "spare" in workers_in_use()
    without = create('[workers.echo]\nkind = "echo"\n')
    with pytest.raises(ConfigNeedsRestart, match=r"workers\.spare: removed while requests or batch jobs use it"):
        version_activate(version_id=without.id, by="ada")
    BatchJob.objects.update(status=BatchJob.Status.COMPLETED)
    assert version_activate(version_id=without.id, by="ada").is_active


@pytest.mark.django_db
def test_a_worker_that_a_realtime_request_in_flight_uses_is_in_use(scope: str) -> None:
    import time

    from pipeline.resilience import admission
    from pipeline.tokenbus import get_bus

    bus = get_bus()
    request_id = uuid.uuid4().hex
    inflight = admission.keys(bus.prefix, "")[0]
    bus.redis.client.zadd(inflight, {request_id: time.time()})
    bus.set_record(request_id, payload=json.dumps({"worker": "vllm-big"}))
    try:
        assert "vllm-big" in workers_in_use()
    finally:
        bus.redis.client.zrem(inflight, request_id)
    assert "vllm-big" not in workers_in_use()


def test_a_usage_source_is_registered_once() -> None:
    def source() -> set[str]:
        return {"x"}

    register_worker_usage(source)
    register_worker_usage(source)
    from pipeline.config import versions

    assert versions._usage.count(source) == 1
    versions._usage.remove(source)


@pytest.mark.django_db
def test_the_file_is_imported_and_activated_when_it_changes(scope: str, tmp_path: Path) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text(BASE, encoding="utf-8")
    first = import_file(path)
    assert first is not None and first.source == ConfigSource.FILE and version_active().id == first.id  # type: ignore[union-attr]
    assert import_file(path) is None  # unchanged: nothing new
    path.write_text(BASE + "[rag]\ntop_k = 7\n", encoding="utf-8")
    second = import_file(path)
    assert second is not None and version_active().id == second.id and settings_of(second).rag.top_k == 7  # type: ignore[union-attr]
    assert import_file(tmp_path / "absent.toml") is None


@pytest.mark.django_db
def test_an_activation_after_the_file_import_wins_until_the_file_changes(scope: str, tmp_path: Path) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text(BASE, encoding="utf-8")
    imported = import_file(path)
    pushed = create(BASE + "[rag]\ntop_k = 9\n")
    version_activate(version_id=pushed.id, by="admin")  # e.g. a rollback in the admin
    with capture_logs() as logs:
        assert import_file(path) is None  # the next start: the file did not change
    assert version_active().id == pushed.id  # type: ignore[union-attr]
    warning = next(e for e in logs if e["event"] == "config_file_not_active")
    assert (warning["file_version"], warning["active_version"], warning["log_level"]) == (imported.id, pushed.id, "warning")  # type: ignore[union-attr]
    path.write_text(BASE + "[rag]\ntop_k = 2\n", encoding="utf-8")
    assert import_file(path) is not None and settings_of(version_active()).rag.top_k == 2  # type: ignore[arg-type]


@pytest.mark.django_db
def test_an_invalid_file_is_rejected_and_the_active_version_stays(scope: str, tmp_path: Path) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text(BASE, encoding="utf-8")
    good = import_file(path)
    path.write_text("[rag]\ntop_k = 0\n", encoding="utf-8")
    with capture_logs() as logs:
        bad = import_file(path)
    assert bad is not None and not bad.valid and version_active().id == good.id  # type: ignore[union-attr]
    assert any(e["event"] == "config_file_rejected" and e["version"] == bad.id for e in logs)


@pytest.mark.django_db
def test_a_file_that_needs_a_restart_is_activated_at_restart(scope: str, tmp_path: Path) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text(BASE, encoding="utf-8")
    import_file(path)
    path.write_text(BASE + "[queues]\nbatch_concurrency = 3\n", encoding="utf-8")
    version = import_file(path)
    active = version_active()
    assert version is not None and active is not None and active.id == version.id and active.applies == ConfigApplies.AT_RESTART


@pytest.mark.django_db
def test_the_diff_is_against_the_active_version(scope: str) -> None:
    active = version_activate(version_id=create(BASE).id, by="ada")
    other = create(BASE + "[rag]\ntop_k = 4\n")
    diff = diff_against_active(other)
    assert f"--- version {active.id} (active)" in diff and f"+++ version {other.id}" in diff and "+top_k = 4" in diff
    assert diff_against_active(active) == ""


@pytest.mark.django_db
def test_history_is_newest_first_within_the_scope(scope: str) -> None:
    made = [create(BASE + f"[rag]\ntop_k = {k}\n").id for k in (1, 2, 3)]
    assert [v.id for v in history(limit=2)] == made[::-1][:2]
    with override_settings(PIPELINE_CONFIG_SCOPE="another"):
        assert all(v.scope == "another" for v in history())


@pytest.mark.django_db
def test_a_request_runs_on_the_version_it_started_on(scope: str) -> None:
    old = create(BASE + '[assemble]\nsystem_prompt = "old"\n')
    new = create(BASE + '[assemble]\nsystem_prompt = "new"\n')
    try:
        set_config(settings_of(new), version=new.id)
        assert config_version() == new.id
        assert config_at(new.id).assemble.system_prompt == "new"
        assert config_at(old.id).assemble.system_prompt == "old"  # stored, cached
        assert stored_settings(old.id) is config_at(old.id)
        assert config_at(0).assemble.system_prompt == "new"  # not a stored version: the process's
        assert config_at(old.id + 10_000).assemble.system_prompt == "new"  # gone: the process's
    finally:
        set_config(None)
    assert config_version() == 0


@pytest.mark.django_db
def test_a_request_is_stamped_with_the_process_version() -> None:
    from pipeline.services.start import infer_build_request

    try:
        set_config(PipelineSettings(), version=41)
        request = infer_build_request(tenant_id="t", data={"prompt": "hi"}, config=PipelineSettings())
    finally:
        set_config(None)
    assert request.config_version == 41
    from pipeline.types import PromptRequest

    assert PromptRequest.from_dict(request.to_dict()).config_version == 41
    assert PromptRequest.from_dict({**request.to_dict(), "config_version": None}).config_version == 0


@pytest.mark.django_db(transaction=True)
def test_activation_notifies_on_commit(scope: str) -> None:
    version = create()
    with psycopg.connect(**connection_params(), autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        version_activate(version_id=version.id, by="ada")
        ready, _, _ = select.select([listener.fileno()], [], [], 2)
        assert ready
        notes = list(listener.notifies(timeout=0.5, stop_after=1))
    assert [n.payload for n in notes] == [f"{scope}:{version.id}"]
