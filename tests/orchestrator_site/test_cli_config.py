"""``orchestrator config``: push, activate and history of the versions in Postgres,
run as installed, against the test database."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
from django.test import override_settings

from pipeline.config.versions import version_active
from pipeline.models import ConfigApplies, ConfigSource, PipelineConfigVersion
from tests.conftest import _database_url
from tests.orchestrator_site.test_cli import SCRIPT

BASE = '[workers.echo]\nkind = "echo"\n'


def run(scope: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": _database_url(), "PIPELINE_CONFIG_SCOPE": scope, "USER": "ada"}
    return subprocess.run([str(SCRIPT), "config", *args], capture_output=True, text=True, timeout=60, env=env, check=False)


@pytest.fixture
def scope() -> str:
    return f"c{uuid.uuid4().hex[:10]}"


@pytest.mark.parametrize("command", ["push", "activate", "history", "--help"])
def test_every_config_command_has_help(command: str) -> None:
    done = subprocess.run(
        [str(SCRIPT), "config", *([command] if command != "--help" else []), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and "Usage: orchestrator config" in done.stdout


@pytest.mark.django_db(transaction=True)
def test_push_stores_a_version_and_activate_makes_it_active(scope: str, tmp_path: Path) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text(BASE, encoding="utf-8")
    pushed = run(scope, "push", str(path), "--comment", "first")
    assert pushed.returncode == 0, pushed.stderr
    version = PipelineConfigVersion.objects.get(scope=scope)
    assert pushed.stdout == f"stored version {version.id}\n"
    assert (version.source, version.author, version.comment, version.is_active) == (ConfigSource.CLI, "ada", "first", False)
    activated = run(scope, "activate", str(version.id))
    assert (activated.returncode, activated.stdout) == (0, f"version {version.id} is active\n")
    with override_settings(PIPELINE_CONFIG_SCOPE=scope):
        active = version_active()
    assert active is not None and active.id == version.id and active.activated_by == "ada"


@pytest.mark.django_db(transaction=True)
def test_push_with_activate_and_a_breaking_change_refused_then_taken_at_restart(scope: str, tmp_path: Path) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text(BASE, encoding="utf-8")
    assert run(scope, "push", str(path), "--activate").returncode == 0
    path.write_text(BASE + "[queues]\nrealtime_concurrency = 2\n", encoding="utf-8")
    refused = run(scope, "push", str(path), "--activate")
    breaking = PipelineConfigVersion.objects.filter(scope=scope).order_by("-id").first()
    assert breaking is not None and refused.returncode == 1
    assert refused.stderr == (
        f"version {breaking.id} cannot apply to running processes: queues.realtime_concurrency: 32 → 2: read when a process starts "
        "(the queue topology and its bounds). Activate it at restart, then restart every process.\n"
    )
    taken = run(scope, "activate", str(breaking.id), "--at-restart")
    assert (taken.returncode, taken.stdout) == (0, f"version {breaking.id} is active (at restart)\n")
    assert PipelineConfigVersion.objects.get(id=breaking.id).applies == ConfigApplies.AT_RESTART


@pytest.mark.django_db(transaction=True)
def test_an_invalid_push_stores_nothing_and_says_why(scope: str, tmp_path: Path) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text("[rag]\ntop_k = 0\n", encoding="utf-8")
    done = run(scope, "push", str(path))
    assert done.returncode == 1 and done.stderr == "the orchestrator command:2: rag.top_k: 0 is too small: the least allowed is 1\n"
    assert not PipelineConfigVersion.objects.filter(scope=scope).exists()
    missing = run(scope, "push", str(tmp_path / "nope.toml"))
    assert missing.returncode == 1 and missing.stderr == f"{tmp_path / 'nope.toml'}: no such file\n"


@pytest.mark.django_db(transaction=True)
def test_activating_a_version_that_does_not_exist(scope: str) -> None:
    done = run(scope, "activate", "987654321")
    assert done.returncode == 1 and done.stderr == "no config version 987654321\n"


@pytest.mark.django_db(transaction=True)
def test_history_lists_the_newest_first_with_the_active_one_marked(scope: str, tmp_path: Path) -> None:
    path = tmp_path / "pipeline.toml"
    for n in (1, 2, 3):
        path.write_text(BASE + f"# {n}\n", encoding="utf-8")
        assert run(scope, "push", str(path), "--comment", f"change {n}", *(["--activate"] if n == 2 else [])).returncode == 0
    done = run(scope, "history", "--limit", "2")
    assert done.returncode == 0
    rows = [line for line in done.stdout.splitlines() if "change" in line]
    assert len(rows) == 2 and "change 3" in rows[0] and "change 2" in rows[1] and "*" in rows[1] and "live" in rows[1] and "*" not in rows[0]


def test_config_commands_without_postgres_say_so(scope: str) -> None:
    # LOG_LEVEL as an operator's shell has it (unset): the command's own words, not its libraries'.
    env = {k: v for k, v in os.environ.items() if k != "LOG_LEVEL"}
    env |= {"DATABASE_URL": "postgres://postgres@127.0.0.1:1/nothing", "DATABASE_POOL_TIMEOUT_S": "1", "PIPELINE_CONFIG_SCOPE": scope}
    done = subprocess.run([str(SCRIPT), "config", "history"], capture_output=True, text=True, timeout=60, env=env, check=False)
    assert done.returncode == 1 and done.stderr.startswith("cannot reach the config versions in Postgres: couldn't get a connection")
    assert len(done.stderr.splitlines()) == 1
