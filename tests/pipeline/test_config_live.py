"""The small rules around the versions: what is never a breaking change, a file of
comments only means the defaults and an empty one is refused, and how a version keeps
and shows its problems."""

from __future__ import annotations

import pytest

from orchestrator_site.errors import ConfigInvalid
from pipeline.config import PipelineSettings, check_text, parse_config
from pipeline.config.problems import Problem
from pipeline.config.versions import breaking_changes, digest_of, settings_of, version_build
from pipeline.models import ConfigSource, PipelineConfigVersion

BASE = '[workers.echo]\nkind = "echo"\n'


def test_adding_workers_or_changing_prices_and_prompts_is_never_breaking() -> None:
    old = parse_config(BASE, source="old")
    new = parse_config(
        BASE.replace('kind = "echo"\n', 'kind = "echo"\nprice_input_per_mtok = 1.5\n')
        + '[workers.more]\nkind = "echo"\n[assemble]\nsystem_prompt = "x"\n[rate_limits]\nrequests_per_minute = 3\n',
        source="new",
    )
    assert breaking_changes(old, new, in_use={"echo", "more"}) == []


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
