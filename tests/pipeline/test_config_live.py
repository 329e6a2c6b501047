"""What applies live, and the small rules around the versions: log levels and new
workers take effect in a following process at once; the watcher ignores its
neighbours; a file of comments only means the defaults, an empty one is refused."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.test import override_settings

from orchestrator_site.errors import ConfigInvalid
from pipeline.config import PipelineSettings, check_text, config_version, get_config, parse_config, set_config
from pipeline.config.problems import Problem
from pipeline.config.reload import FileWatcher, config_start, stop_following
from pipeline.config.versions import breaking_changes, digest_of, settings_of, version_activate, version_build, version_create
from pipeline.models import ConfigApplies, ConfigSource, PipelineConfigVersion
from pipeline.routing import route_request

BASE = '[workers.echo]\nkind = "echo"\n'


@pytest.fixture
def scope(tmp_path: Path) -> Iterator[str]:
    name = f"l{uuid.uuid4().hex[:10]}"
    path = tmp_path / "pipeline.toml"
    path.write_text(BASE, encoding="utf-8")
    with override_settings(PIPELINE_CONFIG_SCOPE=name, PIPELINE_CONFIG_FOLLOW=True, PIPELINE_CONFIG_PATH=str(path), PIPELINE_CONFIG_CHECK_S=30.0):
        yield name
    stop_following()
    set_config(None)
    logging.getLogger("pipeline.routing").setLevel(logging.NOTSET)


def wait_for_version(version: int, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while config_version() != version:
        if time.monotonic() > deadline:
            raise AssertionError(f"still on {config_version()}, not {version}")
        time.sleep(0.01)


@pytest.mark.django_db(transaction=True)
def test_log_levels_and_new_workers_apply_live(scope: str) -> None:
    config_start("gateway")
    text = BASE + '[workers.extra]\nkind = "echo"\nmodels = ["x-1"]\n[logging]\nloggers = { "pipeline.routing" = "ERROR" }\n'
    version = version_activate(version_id=version_create(text=text, source=ConfigSource.CLI).id, by="t")
    assert version.applies == ConfigApplies.LIVE
    wait_for_version(version.id)
    assert logging.getLogger("pipeline.routing").level == logging.ERROR
    assert route_request(get_config(), worker="extra", model=None).model == "x-1"


def test_adding_workers_or_changing_prices_and_prompts_is_never_breaking() -> None:
    old = parse_config(BASE, source="old")
    new = parse_config(
        BASE.replace('kind = "echo"\n', 'kind = "echo"\nprice_input_per_mtok = 1.5\n')
        + '[workers.more]\nkind = "echo"\n[assemble]\nsystem_prompt = "x"\n[rate_limits]\nrequests_per_minute = 3\n',
        source="new",
    )
    assert breaking_changes(old, new, in_use={"echo", "more"}) == []


@pytest.mark.django_db(transaction=True)
def test_the_watcher_imports_its_file_and_not_a_neighbour(scope: str, tmp_path: Path) -> None:
    config_start("beat")
    watcher = FileWatcher(tmp_path / "pipeline.toml")
    watcher.start()
    try:
        time.sleep(0.3)
        (tmp_path / "other.toml").write_text(BASE + "# not the config\n", encoding="utf-8")
        time.sleep(0.6)
        assert PipelineConfigVersion.objects.filter(scope=scope).count() == 1
        (tmp_path / "pipeline.toml").write_text(BASE + "# the config\n", encoding="utf-8")
        deadline = time.monotonic() + 2
        while PipelineConfigVersion.objects.filter(scope=scope).count() < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        watcher.stop()
        watcher.join(timeout=3)
    assert PipelineConfigVersion.objects.filter(scope=scope).count() == 2


def test_a_file_of_comments_means_the_defaults_and_an_empty_one_is_refused() -> None:
    assert check_text("# nothing set here\n\n# at all\n").settings == PipelineSettings()
    assert [p.message for p in check_text(" \n").problems] == [check_text("").problems[0].message]


def test_a_version_carries_its_digest_and_problems() -> None:
    built = version_build(text="[rag]\ntop_k = 0\n", source=ConfigSource.FILE, author="a" * 200, comment="c" * 600)
    assert built.digest == digest_of("[rag]\ntop_k = 0\n") and len(built.author) == 150 and len(built.comment) == 500
    assert not built.valid and Problem(**built.problems[0]).render("f") == "f:2: rag.top_k: 0 is too small: the least allowed is 1"


def test_settings_of_an_invalid_version_names_it() -> None:
    version = PipelineConfigVersion(id=77, text="[rag]\ntop_k = 0\n")
    with pytest.raises(ConfigInvalid) as info:
        settings_of(version)
    assert info.value.message == "version 77:2: rag.top_k: 0 is too small: the least allowed is 1"


def test_a_problem_renders_with_or_without_its_line_and_path() -> None:
    assert Problem("rag.top_k", "bad", 3).render("p.toml") == "p.toml:3: rag.top_k: bad"
    assert Problem("rag.top_k", "bad").render("p.toml") == "p.toml: rag.top_k: bad"
    assert Problem("", "the file is empty").render("p.toml") == "p.toml: the file is empty"
