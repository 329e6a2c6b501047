"""Invalid configs, each with the exact words a person gets: the path, the file's line,
the value given and what is allowed, a suggestion for a misspelt key or name, and
every problem of the file at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator_site.errors import ConfigInvalid
from pipeline.config import check_text, load_config
from pipeline.config.problems import key_lines, line_of, show

OPENAI = 'default_worker = "gpt"\n[workers.gpt]\nkind = "openai"\nbase_url = "https://api.example.com/v1"\n'

INVALID: dict[str, tuple[str, str]] = {
    "empty file": ("", "pipeline.toml: the file is empty: remove it to run on the defaults, or give it settings (pipeline.example.toml shows them all)"),
    "blank lines only": (
        "\n  \n\t\n",
        "pipeline.toml: the file is empty: remove it to run on the defaults, or give it settings (pipeline.example.toml shows them all)",
    ),
    "invalid TOML, with its line": ("[rag]\ntop_k = 3\nenabled = yes\n", "pipeline.toml:3: not valid TOML: invalid value (column 11)"),
    "invalid TOML at the end": ("[rag]\ntop_k = ", "pipeline.toml:2: not valid TOML: invalid value at the end of the file"),
    "a table defined twice": ("[rag]\ntop_k = 3\n[rag]\nenabled = true\n", "pipeline.toml:3: not valid TOML: cannot declare ('rag',) twice (column 5)"),
    "wrong type: a string for an integer": ('[rag]\ntop_k = "3"\n', 'pipeline.toml:2: rag.top_k: "3" is not an integer'),
    "wrong type: a float for an integer": ("[rag]\ntop_k = 2.5\n", "pipeline.toml:2: rag.top_k: 2.5 is not an integer"),
    "wrong type: a string for a boolean": ('[dedup]\nenabled = "yes"\n', 'pipeline.toml:2: dedup.enabled: "yes" is not true or false'),
    "wrong type: a number for a string": ("[assemble]\nsystem_prompt = 7\n", "pipeline.toml:2: assemble.system_prompt: 7 is not a string"),
    "wrong type: a string for an array": ('[postprocess]\nstop = "###"\n', 'pipeline.toml:2: postprocess.stop: "###" is not an array'),
    "wrong type: a value for a table": ("rag = 3\n", "pipeline.toml:1: rag: 3 is not a table"),
    "out of range, below": (
        OPENAI + "[workers.gpt.retry]\nattempts = 0\n",
        "pipeline.toml:6: workers.gpt.retry.attempts: 0 is too small: the least allowed is 1",
    ),
    "out of range, above": ("[rag]\ntop_k = 51\n", "pipeline.toml:2: rag.top_k: 51 is too large: the most allowed is 50"),
    "out of range, not more than": ("[limits]\nrequest_timeout_s = 0\n", "pipeline.toml:2: limits.request_timeout_s: 0 is too small: it must be more than 0"),
    "not a finite number": ("[limits]\nrequest_timeout_s = inf\n", "pipeline.toml:2: limits.request_timeout_s: inf is not a finite number"),
    "a pattern mismatch": ('[rag]\ntext_search_config = "English"\n', 'pipeline.toml:2: rag.text_search_config: "English" does not match ^[a-z_]+$'),
    "an unknown key with a suggestion": ("[rag]\ntimout_ms = 100\n", 'pipeline.toml:2: rag.timout_ms: unknown key; did you mean "timeout_ms"?'),
    "an unknown top-level key with a suggestion": ("[limit]\nmax_prompt_chars = 10\n", 'pipeline.toml:1: limit: unknown key; did you mean "limits"?'),
    "an unknown key with nothing close": (
        "[tokenbus]\nbackend_url = 1\n",
        "pipeline.toml:2: tokenbus.backend_url: unknown key; allowed: maxlen, ttl_s",
    ),
    "an unknown worker kind with a suggestion": (
        '[workers.x]\nkind = "openia"\nbase_url = "http://x"\n',
        'pipeline.toml: default_worker: "echo" is not a worker; the workers are "x"\npipeline.toml:2: workers.x.kind: "openia" is not allowed; allowed: "echo", "openai", "anthropic", "llamacpp", "vllm"; did you mean "openai"?',
    ),
    "a missing required key": ("[workers.echo]\nmodels = []\n", "pipeline.toml:1: workers.echo.kind: is required"),
    "a default worker that does not exist": (
        'default_worker = "ecko"\n',
        'pipeline.toml:1: default_worker: "ecko" is not a worker; the workers are "echo"; did you mean "echo"?',
    ),
    "a worker without its URL": (
        '[workers.echo]\nkind = "echo"\n[workers.x]\nkind = "anthropic"\n',
        "pipeline.toml:3: workers.x.base_url: a anthropic worker needs base_url",
    ),
    "a default model outside models": (
        '[workers.echo]\nkind = "echo"\nmodels = ["echo-1", "echo-2"]\ndefault_model = "echo-3"\n',
        'pipeline.toml:4: workers.echo.default_model: "echo-3" is not one of models: "echo-1", "echo-2"; did you mean "echo-2"?',
    ),
    "a fallback to itself": (
        '[workers.echo]\nkind = "echo"\nfallback = "echo"\n',
        'pipeline.toml:3: workers.echo.fallback: "echo" is this worker itself; name another worker',
    ),
    "a fallback to a missing worker": (
        '[workers.echo]\nkind = "echo"\nfallback = "lokal"\n[workers.local]\nkind = "llamacpp"\nbase_url = "http://127.0.0.1:8081"\n',
        'pipeline.toml:3: workers.echo.fallback: "lokal" is not a worker; the others are "local"; did you mean "local"?',
    ),
    "a fallback loop": (
        '[workers.echo]\nkind = "echo"\n[workers.b]\nkind = "echo"\nfallback = "c"\n[workers.c]\nkind = "echo"\nfallback = "d"\n[workers.d]\nkind = "echo"\nfallback = "b"\n',
        "pipeline.toml:5: workers.b.fallback: fallback loop: b → c → d → b",
    ),
    "an unknown placeholder in a template": (
        '[assemble]\ncontext_template = "Use this: {ctx}"\n',
        'pipeline.toml:2: assemble.context_template: "Use this: {ctx}": unknown placeholder {ctx}; allowed: {context}',
    ),
    "a template that does not parse": (
        '[assemble]\ndocument_template = "{title"\n',
        "pipeline.toml:2: assemble.document_template: \"{title\": not a valid template: expected '}' before end of string",
    ),
    "an invalid regex": (
        '[[postprocess.patterns]]\nname = "ssn"\npattern = "(\\\\d{3}"\n',
        'pipeline.toml:3: postprocess.patterns.0.pattern: "(\\\\d{3}": not a valid regular expression: missing ), unterminated subpattern at position 0',
    ),
    "default max tokens over the limit": (
        "[limits]\ndefault_max_tokens = 10\nmax_tokens_limit = 5\n",
        "pipeline.toml:2: limits.default_max_tokens: 10 is more than limits.max_tokens_limit (5)",
    ),
    "a log level in lower case": (
        '[logging]\nlevel = "debug"\n',
        'pipeline.toml:2: logging.level: "debug" is not allowed; allowed: "", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"; did you mean "DEBUG"?',
    ),
    "a logger name that is not one": (
        '[logging]\nloggers = { "pipeline services" = "DEBUG" }\n',
        "pipeline.toml:2: logging.loggers: a table: 'pipeline services' is not a logger name (dotted identifiers, such as pipeline.services)",
    ),
    "a bad pipeline name": ('[pipeline]\nname = "my pipeline"\n', 'pipeline.toml:2: pipeline.name: "my pipeline" does not match ^[A-Za-z0-9][A-Za-z0-9._-]*$'),
    "a concurrency bound out of range": (
        "[queues]\nrealtime_concurrency = 0\n",
        "pipeline.toml:2: queues.realtime_concurrency: 0 is too small: the least allowed is 1",
    ),
    "a date where a number belongs": ("[batch]\nlease_s = 2026-12-07\n", 'pipeline.toml:2: batch.lease_s: "2026-12-07" is not a number'),
    "every problem at once": (
        'default_worker = "nope"\n[rag]\ntop_k = 0\ntimout_ms = 3\n[workers.echo]\nkind = "echo"\nfallback = "echo"\n[limits]\nmax_prompt_chars = "big"\n',
        'pipeline.toml:1: default_worker: "nope" is not a worker; the workers are "echo"\n'
        "pipeline.toml:3: rag.top_k: 0 is too small: the least allowed is 1\n"
        'pipeline.toml:4: rag.timout_ms: unknown key; did you mean "timeout_ms"?\n'
        'pipeline.toml:7: workers.echo.fallback: "echo" is this worker itself; name another worker\n'
        'pipeline.toml:9: limits.max_prompt_chars: "big" is not an integer',
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_an_invalid_config_gets_its_exact_message(tmp_path: Path, case: str) -> None:
    text, expected = INVALID[case]
    path = tmp_path / "pipeline.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigInvalid) as info:
        load_config(path)
    assert info.value.message.replace(str(path), "pipeline.toml") == expected
    assert info.value.data["file"] == str(path)
    assert len(info.value.data["problems"]) == expected.count("\n") + 1


def test_the_table_has_the_cases_the_issue_names() -> None:
    assert len(INVALID) >= 25


def test_each_problem_is_data_a_program_can_read() -> None:
    problems = check_text('[rag]\ntop_k = 0\n[workers.echo]\nkind = "echo"\nfallback = "ech"\n').problems
    assert [p.to_dict() for p in problems] == [
        {"path": "rag.top_k", "message": "0 is too small: the least allowed is 1", "line": 2},
        {"path": "workers.echo.fallback", "message": '"ech" is not a worker; there is no other worker', "line": 5},
    ]


def test_a_non_utf8_file_is_refused_with_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_bytes(b"[rag]\ntop_k = 3 # \xff\n")
    with pytest.raises(ConfigInvalid) as info:
        load_config(path)
    assert info.value.message == f"{path}: not UTF-8 text: invalid start byte at byte 18"


def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigInvalid) as info:
        load_config(tmp_path)  # a directory: it exists, and cannot be read as a file
    assert info.value.message == f"{tmp_path}: cannot be read: Is a directory"


def test_key_lines_find_keys_tables_and_array_items_past_multiline_values() -> None:
    text = '# a comment\n\n[assemble]\nsystem_prompt = """\nline one\nline two\n"""\nhistory_turns = 2\n\n[[postprocess.patterns]]\nname = "a"\npattern = "x"\n[[postprocess.patterns]]\nname = "b"\n'
    lines = key_lines(text)
    assert lines[("assemble",)] == 3 and lines[("assemble", "system_prompt")] == 4 and lines[("assemble", "history_turns")] == 8
    assert lines[("postprocess", "patterns", 0)] == 10 and lines[("postprocess", "patterns", 1, "name")] == 14
    assert line_of(("postprocess", "patterns", 1, "max_length"), lines) == 13  # absent: the nearest table's line
    assert line_of(("rag", "top_k"), lines) is None


def test_values_are_shown_as_toml_writes_them() -> None:
    assert [show(v) for v in (True, False, 'a"b', {"a": 1}, [1], 2.5)] == ["true", "false", '"a\\"b"', "a table", "an array", "2.5"]
