"""The pieces behind a config's problems: how each kind of error is worded, where a
key's line is found, which table an unknown key was in, the cross-field checks on
tables of the wrong shape, and ``orchestrator explain`` on each kind of setting."""

from __future__ import annotations

import tomllib

import pytest

from pipeline.config import PipelineSettings, check_text, parse_config
from pipeline.config.explain import explain
from pipeline.config.loading import toml_problem
from pipeline.config.problems import Problem, _model_at, describe, key_lines
from pipeline.config.schema import BreakerConfig, RedactionPattern, RetryConfig, WorkerConfig, reference_problems, suggestion


def messages(text: str) -> list[str]:
    return [f"{p.line}: {p.path}: {p.message}" for p in check_text(text).problems]


@pytest.mark.parametrize(
    ("error", "words"),
    [
        ({"type": "missing", "input": {}}, "is required"),
        ({"type": "string_too_short", "input": "", "ctx": {"min_length": 1}}, '"" is too short: at least 1 character(s)'),
        ({"type": "string_too_long", "input": "abc", "ctx": {"max_length": 2}}, '"abc" is too long: at most 2 characters'),
        ({"type": "less_than", "input": 9, "ctx": {"lt": 5}}, "9 is too large: it must be less than 5"),
        ({"type": "less_than_equal", "input": 9.5, "ctx": {"le": 5.0}}, "9.5 is too large: the most allowed is 5"),
        ({"type": "greater_than", "input": 0.0, "ctx": {"gt": 0.0}}, "0 is too small: it must be more than 0"),
        ({"type": "literal_error", "input": 3, "ctx": {"expected": "'a' or 'b'"}}, 'not allowed; allowed: "a", "b"'),
        ({"type": "value_error", "input": "x", "msg": "Value error, nope", "ctx": {}}, '"x": Value error, nope'),
        ({"type": "something_new", "input": [1], "msg": "Pydantic's own words"}, "an array: Pydantic's own words"),
        ({"type": "dict_type", "input": True}, "true is not a table"),
    ],
)
def test_each_kind_of_error_in_words(error: dict, words: str) -> None:
    assert words in describe(error)


def test_a_literal_given_a_number_gets_no_suggestion() -> None:
    assert describe({"type": "literal_error", "input": 3, "ctx": {"expected": "'echo' or 'openai'"}}) == '3 is not allowed; allowed: "echo", "openai"'


def test_the_table_of_an_unknown_key_is_found_through_dicts_and_arrays() -> None:
    assert _model_at(()) is PipelineSettings
    assert _model_at(("workers", "gpt")) is WorkerConfig
    assert _model_at(("workers", "gpt", "retry")) is RetryConfig
    assert _model_at(("workers", "gpt", "breaker")) is BreakerConfig
    assert _model_at(("postprocess", "patterns", 0)) is RedactionPattern
    assert _model_at(("rag", "top_k")) is None  # a value, not a table
    assert _model_at(("nope",)) is None
    assert _model_at(("logging", "loggers", "x")) is None  # a table of levels, not of a model


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[workers.echo]\nkind = "echo"\n[workers.echo.retry]\nattempt = 2\n', ['4: workers.echo.retry.attempt: unknown key; did you mean "attempts"?']),
        ('[workers.echo]\nkind = "echo"\n[workers.echo.breaker]\nopen_secs = 2\n', ['4: workers.echo.breaker.open_secs: unknown key; did you mean "open_s"?']),
        ('[[postprocess.patterns]]\nname = "a"\npattern = "x"\nmax_len = 3\n', ['4: postprocess.patterns.0.max_len: unknown key; did you mean "max_length"?']),
        ('[workers.echo]\nkind = "echo"\nbase_ulr = "http://x"\n', ['3: workers.echo.base_ulr: unknown key; did you mean "base_url"?']),
        (
            '[logging]\nloggers = { "celery" = "LOUD" }\n',
            ['2: logging.loggers.celery: "LOUD" is not allowed; allowed: "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"'],
        ),
        ('[pipeline]\nname = ""\n', ['2: pipeline.name: "" is too short: at least 1 character(s)']),
        ("[pipeline]\nversion = 2\n", ["2: pipeline.version: 2 is not a string"]),
        ("[queues]\npublish_threads = 65\n", ["2: queues.publish_threads: 65 is too large: the most allowed is 64"]),
        ("workers = []\n", ["1: workers: an array is not a table"]),
    ],
)
def test_problems_in_nested_and_new_tables(text: str, expected: list[str]) -> None:
    assert messages(text) == expected


def test_dotted_inline_and_quoted_keys_have_their_lines() -> None:
    text = 'rag.top_k = 3\nworkers.echo = { kind = "echo", models = ["a"] }\n"assemble" . "history_turns" = 2\nstop_list = [\n  "a",\n  "b",\n]\n'
    lines = key_lines(text)
    assert lines[("rag",)] == 1 and lines[("rag", "top_k")] == 1
    assert lines[("workers", "echo", "kind")] == 2 and lines[("workers", "echo", "models", 0)] == 2
    assert lines[("assemble", "history_turns")] == 3
    assert lines[("stop_list",)] == 4 and lines[("stop_list", 1)] == 4


def test_a_comment_before_a_key_does_not_take_its_line() -> None:
    assert key_lines("# top\n\n# about rag\n[rag]\n# the count\ntop_k = 3\n")[("rag", "top_k")] == 6


def test_a_toml_error_without_a_position_keeps_its_words() -> None:
    assert toml_problem(tomllib.TOMLDecodeError("odd"), "x") == Problem("", "not valid TOML: odd")


def test_reference_checks_pass_over_tables_of_the_wrong_shape() -> None:
    assert reference_problems({"workers": [], "default_worker": "echo"}) == []
    assert reference_problems({"workers": {}, "default_worker": "echo"}) == [(("default_worker",), '"echo" is not a worker; there are no workers')]
    assert reference_problems({"workers": {"echo": 3}, "limits": "x"}) == []
    assert reference_problems({"workers": {"echo": {"kind": "echo", "models": "a", "default_model": "b", "fallback": 7}}}) == []
    assert reference_problems({"default_worker": 5, "workers": {"echo": {"kind": "echo"}}, "limits": {"default_max_tokens": "9", "max_tokens_limit": 1}}) == []


def test_two_fallback_loops_are_each_reported_once() -> None:
    workers = {
        "a": {"kind": "echo", "fallback": "b"},
        "b": {"kind": "echo", "fallback": "a"},
        "c": {"kind": "echo", "fallback": "d"},
        "d": {"kind": "echo", "fallback": "e"},
        "e": {"kind": "echo", "fallback": "c"},
        "f": {"kind": "echo", "fallback": "a"},  # into a loop, not part of it
        "echo": {"kind": "echo"},
    }
    assert reference_problems({"workers": workers}) == [
        (("workers", "a", "fallback"), "fallback loop: a → b → a"),
        (("workers", "c", "fallback"), "fallback loop: c → d → e → c"),
    ]


def test_a_fallback_chain_that_ends_is_no_loop() -> None:
    workers = {"echo": {"kind": "echo", "fallback": "b"}, "b": {"kind": "echo", "fallback": "c"}, "c": {"kind": "echo"}}
    assert reference_problems({"workers": workers}) == []


def test_an_unknown_kind_is_not_also_asked_for_a_url() -> None:
    assert reference_problems({"default_worker": "x", "workers": {"x": {"kind": "bard"}}}) == []


def test_suggestions_ignore_case_and_stay_quiet_when_nothing_is_close() -> None:
    assert suggestion("Echo", ["echo", "local"]) == '; did you mean "echo"?'
    assert suggestion("zzzz", ["echo", "local"]) == ""
    assert suggestion("x", []) == ""


def test_a_config_built_in_code_holds_the_same_invariants() -> None:
    with pytest.raises(ValueError, match=r"limits\.default_max_tokens: 10 is more than limits\.max_tokens_limit \(5\)"):
        PipelineSettings.model_validate({"limits": {"default_max_tokens": 10, "max_tokens_limit": 5}})
    with pytest.raises(ValueError, match="fallback loop: a → b → a"):
        PipelineSettings.model_validate({"workers": {"echo": {"kind": "echo"}, "a": {"kind": "echo", "fallback": "b"}, "b": {"kind": "echo", "fallback": "a"}}})


def test_the_problems_of_a_file_are_ordered_by_line_then_path() -> None:
    lines = [p.line for p in check_text("[rag]\ntop_k = 0\nenabled = 3\n[dedup]\nwindow_s = 0\n").problems]
    assert lines == [2, 3, 5]


EXPLAINED = [
    ("[rag]\nenabled = false\n", "rag: off, prompts get no context"),
    ('[postprocess]\nstop = ["###", "END"]\ntrim = false\n', "post-process: keeps whitespace; stops at '###', 'END'"),
    ("[postprocess]\nredact_emails = false\nredact_api_keys = false\n", "redacts nothing"),
    ('[[postprocess.patterns]]\nname = "ssn"\npattern = "x"\n', "replaces e-mail addresses, API keys, ssn matches with '[REDACTED]'"),
    ("[rate_limits]\nrequests_per_minute = 60\ntokens_per_minute = 1000\n", "tenants without their own limits: 60 requests per minute, 1000 tokens per minute"),
    ("[dedup]\nenabled = false\n", "deduplication is off"),
    ('[logging]\nlevel = "ERROR"\nloggers = { "celery" = "DEBUG" }\n', "root at ERROR; celery at DEBUG"),
    ('[assemble]\nsystem_prompt = "' + "word " * 30 + '"\n', 'system prompt "word word word word word word word word word word word word…"'),
    ("[queues]\nrealtime_concurrency = 7\n", "a real-time worker runs 7 requests at once"),
]


@pytest.mark.parametrize(("text", "phrase"), EXPLAINED)
def test_explain_says_what_each_setting_does(text: str, phrase: str) -> None:
    assert phrase in explain(parse_config(text, source="t")).text()


def test_explain_warns_of_a_deadline_shorter_than_a_call() -> None:
    text = '[limits]\nrequest_timeout_s = 10\n[workers.echo]\nkind = "echo"\n[workers.g]\nkind = "anthropic"\nbase_url = "http://x"\napi_key_env = "NOT_SET_ANYWHERE_X"\ntimeout_s = 60\nretry = { attempts = 1 }\n'
    out = explain(parse_config(text, source="t")).text()
    assert "limits.request_timeout_s is shorter than a worker's timeout_s" in out
    assert "g reads its API key from NOT_SET_ANYWHERE_X, which is not set in this environment" in out
    assert "g: anthropic at http://x; models any model (default anthropic); no retry;" in out


def test_explain_of_a_quiet_config_says_there_are_no_warnings() -> None:
    text = "[rate_limits]\nrequests_per_minute = 5\n"
    assert explain(parse_config(text, source="t")).text().endswith("Warnings: none\n")
