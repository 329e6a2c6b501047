"""A process's start with the stored versions: an invalid file with nothing to fall
back on stops it with every problem; with an active version it runs that one; starts
at the same moment import the file once; and the follower's check, step by step."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from django.db import close_old_connections, connection
from django.test import override_settings
from structlog.testing import capture_logs

from orchestrator_site.errors import ConfigInvalid
from pipeline.config import config_version, get_config, set_config
from pipeline.config.reload import ConfigFollower, config_start, connection_params, stop_following
from pipeline.config.versions import import_file, version_activate, version_active, version_create
from pipeline.models import ConfigApplies, ConfigSource, PipelineConfigVersion

BASE = '[workers.echo]\nkind = "echo"\n'


@pytest.fixture
def scope(tmp_path: Path) -> Iterator[str]:
    name = f"s{uuid.uuid4().hex[:10]}"
    with override_settings(PIPELINE_CONFIG_SCOPE=name, PIPELINE_CONFIG_FOLLOW=True, PIPELINE_CONFIG_PATH=str(tmp_path / "pipeline.toml")):
        yield name
    stop_following()
    set_config(None)


def listener() -> psycopg.Connection:
    return psycopg.connect(**connection_params(), autocommit=True)


@pytest.mark.django_db(transaction=True)
def test_an_invalid_file_with_no_version_to_run_stops_the_start_with_every_problem(scope: str, tmp_path: Path) -> None:
    (tmp_path / "pipeline.toml").write_text("[rag]\ntop_k = 0\n[dedup]\nwindow_s = 0\n", encoding="utf-8")
    with pytest.raises(ConfigInvalid) as info:
        config_start("gateway", follow=False)
    assert info.value.message.splitlines() == [
        f"{tmp_path / 'pipeline.toml'}:2: rag.top_k: 0 is too small: the least allowed is 1",
        f"{tmp_path / 'pipeline.toml'}:4: dedup.window_s: 0 is too small: the least allowed is 1",
    ]
    stored = PipelineConfigVersion.objects.get(scope=scope)
    assert not stored.valid and not stored.is_active and len(stored.problems) == 2  # visible in the admin


@pytest.mark.django_db(transaction=True)
def test_an_invalid_file_with_an_active_version_runs_that_version(scope: str, tmp_path: Path) -> None:
    good = version_activate(version_id=version_create(text=BASE + "[rag]\ntop_k = 5\n", source=ConfigSource.CLI).id, by="t")
    (tmp_path / "pipeline.toml").write_text("[rag]\ntop_k = 0\n", encoding="utf-8")
    with capture_logs() as logs:
        config_start("gateway", follow=False)
    assert config_version() == good.id and get_config().rag.top_k == 5
    assert [e["event"] for e in logs if e.get("outcome") == "rejected"] == ["config_file_rejected"]


@pytest.mark.django_db(transaction=True)
def test_starts_at_the_same_moment_import_the_file_once(scope: str, tmp_path: Path) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text(BASE + "# shared\n", encoding="utf-8")
    barrier = threading.Barrier(4)
    imported: list[object] = []

    def start() -> None:
        try:
            barrier.wait()
            imported.append(import_file(path))
        finally:
            close_old_connections()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len([v for v in imported if v is not None]) == 1
    assert PipelineConfigVersion.objects.filter(scope=scope).count() == 1 and version_active() is not None


def test_the_follower_connects_as_django_does() -> None:
    params = connection_params()
    assert params["dbname"] == connection.settings_dict["NAME"] and params["host"] == connection.settings_dict["HOST"]
    assert params["connect_timeout"] == connection.settings_dict["OPTIONS"]["connect_timeout"]  # OPTIONS come along (sslmode too)


@pytest.mark.django_db(transaction=True)
def test_the_follower_catches_up_only_with_a_live_version_it_does_not_run(scope: str) -> None:
    follower = ConfigFollower(scope=scope, check_s=60)
    live = version_activate(version_id=version_create(text=BASE + "[rag]\ntop_k = 4\n", source=ConfigSource.CLI).id, by="t")
    with listener() as conn:
        follower.catch_up(conn)
        assert config_version() == live.id and get_config().rag.top_k == 4
        set_config(get_config(), version=live.id)
        follower.catch_up(conn)  # the version it runs: nothing to do
        assert config_version() == live.id
        later = version_activate(
            version_id=version_create(text=BASE + "[queues]\nbatch_concurrency = 7\n", source=ConfigSource.CLI).id, by="t", at_restart=True
        )
        with capture_logs() as logs:
            follower.catch_up(conn)
            follower.catch_up(conn)
        assert config_version() == live.id and later.applies == ConfigApplies.AT_RESTART
        assert [e["event"] for e in logs] == ["config_waits_for_restart"]


@pytest.mark.django_db(transaction=True)
def test_a_stored_version_this_release_cannot_read_is_refused_and_the_config_kept(scope: str) -> None:
    """A newer release may store a key this one does not know: the follower keeps what it runs."""
    running = version_activate(version_id=version_create(text=BASE, source=ConfigSource.CLI).id, by="t")
    set_config(get_config(), version=running.id)
    newer = version_create(text=BASE, source=ConfigSource.CLI)
    PipelineConfigVersion.objects.filter(id=newer.id).update(text=BASE + '[tokenbus]\nbackend = "nats"\n')
    PipelineConfigVersion.objects.filter(scope=scope, is_active=True).update(is_active=False)
    PipelineConfigVersion.objects.filter(id=newer.id).update(is_active=True)
    with listener() as conn, capture_logs() as logs:
        ConfigFollower(scope=scope, check_s=60).catch_up(conn)
    assert config_version() == running.id
    rejected = next(e for e in logs if e["event"] == "config_rejected")
    assert rejected["version"] == newer.id and rejected["problems"][0]["path"] == "tokenbus.backend"


@pytest.mark.django_db(transaction=True)
def test_no_active_version_leaves_the_process_as_it_is(scope: str) -> None:
    set_config(None)
    with listener() as conn:
        ConfigFollower(scope=scope, check_s=60).catch_up(conn)
    assert config_version() == 0
