"""``docs/configuration.md`` as a reader sees it: one section per TOML table, in the
file's own header syntax, each key with its type, default, meaning and bounds."""

from __future__ import annotations

import re

import pytest
from django.test import override_settings

from pipeline.config import (
    BreakerConfig,
    LimitsConfig,
    LoggingConfig,
    PipelineInfo,
    PipelineSettings,
    PostprocessConfig,
    QueuesConfig,
    RedactionPattern,
    RetryConfig,
    RouteCandidate,
    RouteGroup,
    WorkerConfig,
    get_config,
    set_config,
)
from pipeline.config.loading import check_text
from pipeline.config.reference import json_schema, markdown

PAGE = markdown()


def section(header: str) -> str:
    """The rows of the section whose heading is ``header``."""
    start = PAGE.index(f"\n## {header}\n")
    end = PAGE.find("\n## ", start + 1)
    return PAGE[start : end if end != -1 else None]


def row(header: str, key: str) -> str:
    found = re.search(rf"^\| `{re.escape(key)}` \|.*$", section(header), re.MULTILINE)
    assert found is not None, f"{key} not in {header}"
    return found.group(0)


def test_every_table_has_its_section_in_toml_header_syntax() -> None:
    headings = re.findall(r"^## (.+)$", PAGE, re.MULTILINE)
    assert headings == [
        "Top level",
        "`[pipeline]`",
        "`[workers.NAME]`",
        "`[workers.NAME.retry]`",
        "`[workers.NAME.breaker]`",
        "`[rag]`",
        "`[assemble]`",
        "`[postprocess]`",
        "`[[postprocess.patterns]]`",
        "`[limits]`",
        "`[tokenbus]`",
        "`[rate_limits]`",
        "`[dedup]`",
        "`[batch]`",
        "`[logging]`",
        "`[queues]`",
        "`[routes.NAME]`",
        "`[[routes.NAME.candidates]]`",
    ]


SECTIONS = {
    "Top level": (PipelineSettings, {"default_worker"}),
    "`[pipeline]`": (PipelineInfo, None),
    "`[workers.NAME]`": (WorkerConfig, set(WorkerConfig.model_fields) - {"retry", "breaker"}),
    "`[workers.NAME.retry]`": (RetryConfig, None),
    "`[workers.NAME.breaker]`": (BreakerConfig, None),
    "`[postprocess]`": (PostprocessConfig, None),
    "`[[postprocess.patterns]]`": (RedactionPattern, None),
    "`[logging]`": (LoggingConfig, None),
    "`[queues]`": (QueuesConfig, None),
    "`[limits]`": (LimitsConfig, None),
    "`[routes.NAME]`": (RouteGroup, None),
    "`[[routes.NAME.candidates]]`": (RouteCandidate, None),
}


@pytest.mark.parametrize("header", list(SECTIONS))
def test_every_field_of_a_table_has_its_row(header: str) -> None:
    model, keys = SECTIONS[header]
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", section(header), re.MULTILINE))
    assert rows == (keys if keys is not None else set(model.model_fields))


@pytest.mark.parametrize(
    ("header", "key", "expected"),
    [
        ("Top level", "default_worker", '| `default_worker` | string | `"echo"` | The worker a request uses when it names none. |'),
        ("`[workers.NAME]`", "kind", '| `kind` | "echo" \\| "openai" \\| "anthropic" \\| "llamacpp" \\| "vllm" | required | The provider\'s protocol. |'),
        ("`[workers.NAME]`", "models", "| `models` | array of string | `[]` | What a request may ask for (empty: anything). |"),
        (
            "`[workers.NAME.retry]`",
            "attempts",
            "| `attempts` | integer | `3` | Calls in all, the first one included; 1 = no retry. Only transient errors are retried. (≥ 1, ≤ 10) |",
        ),
        ("`[workers.NAME.breaker]`", "open_s", "| `open_s` | number | `30` | How long it stays open before trial calls. (> 0) |"),
        (
            "`[assemble]`",
            "context_template",
            "| `context_template` | string | see `pipeline.example.toml` | How retrieved context enters the prompt; placeholder {context}. |",
        ),
        (
            "`[rag]`",
            "text_search_config",
            '| `text_search_config` | string | `"english"` | The Postgres text search configuration of the search. (matches `^[a-z_]+$`) |',
        ),
        ("`[[postprocess.patterns]]`", "pattern", "| `pattern` | string | required | A Python regular expression; its matches are replaced. |"),
        ("`[logging]`", "loggers", '| `loggers` | table of "DEBUG" \\| "INFO" \\| "WARNING" \\| "ERROR" \\| "CRITICAL" | `{}` |'),
        ("`[pipeline]`", "name", "(length ≥ 1, length ≤ 100, matches `^[A-Za-z0-9][A-Za-z0-9._-]*$`) |"),
        (
            "`[queues]`",
            "publish_threads",
            "| `publish_threads` | integer | `4` | Threads of a gateway process that publish real-time tasks to the broker. (≥ 1, ≤ 64) |",
        ),
    ],
)
def test_rows_say_type_default_meaning_and_bounds(header: str, key: str, expected: str) -> None:
    assert expected in row(header, key)


def test_a_table_section_carries_its_description() -> None:
    assert "The RAG stage: context from the tenant's documents." in section("`[rag]`")
    assert "Retries of transient provider errors." in section("`[workers.NAME.retry]`")


def test_the_schema_forbids_unknown_keys_in_every_table() -> None:
    schema = json_schema()
    assert schema["additionalProperties"] is False
    assert all(definition.get("additionalProperties") is False for definition in schema["$defs"].values())


def test_the_schema_describes_every_key() -> None:
    schema = json_schema()
    undocumented = [
        f"{name}.{key}" for name, definition in schema["$defs"].items() for key, prop in definition["properties"].items() if not prop.get("description")
    ]
    assert undocumented == []
    assert all(prop.get("description") for prop in schema["properties"].values())


def test_toml_dates_and_times_where_none_belong_are_reported_as_given() -> None:
    problems = check_text("[rag]\ntop_k = 2026-12-07T10:00:00Z\n[dedup]\nenabled = 07:30:00\n").problems
    assert [(p.line, p.path, p.message) for p in problems] == [
        (2, "rag.top_k", '"2026-12-07T10:00:00+00:00" is not an integer'),
        (4, "dedup.enabled", '"07:30:00" is not true or false'),
    ]


def test_a_date_for_a_string_field_is_still_a_string_to_pydantic() -> None:
    config = check_text("[pipeline]\nversion = 2026-12-07\n").settings
    assert config is not None and config.pipeline.version == "2026-12-07"


def test_the_process_config_sets_the_root_level_from_the_environment_when_the_file_does_not(tmp_path: object) -> None:
    import logging
    from pathlib import Path

    path = Path(str(tmp_path)) / "pipeline.toml"
    path.write_text('[logging]\nloggers = { "pipeline.config" = "ERROR" }\n', encoding="utf-8")
    before = logging.getLogger().level
    try:
        set_config(None)
        with override_settings(PIPELINE_CONFIG_PATH=str(path), LOG_LEVEL="WARNING"):
            get_config()
            assert logging.getLogger().level == logging.WARNING
            assert logging.getLogger("pipeline.config").level == logging.ERROR
    finally:
        set_config(PipelineSettings())
        set_config(None)
        logging.getLogger().setLevel(before)
