"""The lines ``orchestrator batch submit`` reads, in process: prompt lines and OpenAI
batch request lines become the API's prompts, one model per file, destinations from
``--to``; and each refusal names its line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st

from orchestrator_site.cli_batch import destination_of, prompt_of, read_prompts


def openai_line(content: object, *, url: str = "/v1/chat/completions", model: str = "echo-1", role: str = "user") -> str:
    body = {"model": model, "messages": [{"role": role, "content": content}]}
    return json.dumps({"custom_id": "r", "method": "POST", "url": url, "body": body})


@pytest.mark.parametrize(
    ("line", "prompt"),
    [
        ('{"prompt": "hi"}', {"prompt": "hi"}),
        ('{"prompt": "hi", "custom_id": "a-1"}', {"prompt": "hi", "custom_id": "a-1"}),
        (openai_line("hello"), {"prompt": "hello", "custom_id": "r"}),
    ],
)
def test_a_line_becomes_a_prompt(line: str, prompt: dict[str, str]) -> None:
    assert prompt_of(line, 1) == prompt


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("nope", "line 7: not JSON"),
        ('"a string"', "line 7: must be a JSON object"),
        ('{"custom_id": "x"}', 'line 7: needs "prompt"'),
        (openai_line("hi", url="/v1/embeddings"), 'line 7: needs "prompt"'),
        (openai_line([{"type": "text", "text": "hi"}]), "line 7: only one user message with text content"),
        (openai_line("hi", role="system"), "line 7: only one user message"),
        (json.dumps({"url": "/v1/chat/completions", "body": {"messages": "hi"}}), 'line 7: needs "prompt"'),
        (json.dumps({"url": "/v1/chat/completions", "body": "hi"}), 'line 7: needs "prompt"'),
    ],
)
def test_a_bad_line_is_named(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        prompt_of(line, 7)


@given(text=st.text(min_size=1), custom_id=st.text(max_size=64))
def test_any_prompt_line_is_passed_on_as_written(text: str, custom_id: str) -> None:
    assert prompt_of(json.dumps({"prompt": text, "custom_id": custom_id}), 1) == {"prompt": text, "custom_id": custom_id}


def test_a_file_skips_blank_lines_and_names_its_one_model(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(f'{{"prompt": "a"}}\n\n   \n{openai_line("b")}\n{openai_line("c")}\n')
    prompts, model = read_prompts(path)
    assert [p["prompt"] for p in prompts] == ["a", "b", "c"] and model == "echo-1"
    path.write_text('{"prompt": "only"}\n')
    assert read_prompts(path) == ([{"prompt": "only"}], None)


def test_a_file_of_two_models_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(f"{openai_line('a', model='m-1')}\n{openai_line('b', model='m-2')}\n")
    with pytest.raises(ValueError, match="one model per file, as in OpenAI's batches: this one names m-1, m-2"):
        read_prompts(path)


def test_a_bad_line_deep_in_a_file_is_named_by_its_number(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{oops\n')
    with pytest.raises(ValueError, match="line 4: not JSON"):
        read_prompts(path)


def test_destinations_from_to(capsys: pytest.CaptureFixture[str]) -> None:
    assert destination_of("file://runs/a.jsonl") == {"kind": "file", "path": "runs/a.jsonl"}
    # The path as written: the gateway checks it (relative, under its output directory).
    assert destination_of("file://a b.jsonl") == {"kind": "file", "path": "a b.jsonl"}
    assert destination_of("file:///abs.jsonl") == {"kind": "file", "path": "/abs.jsonl"}
    for target in ("file://", "https://example.com/hook", "s3://bucket/key"):
        with pytest.raises(typer.Exit) as refused:
            destination_of(target)
        assert refused.value.exit_code == 2
        assert f"--to {target}: only file://PATH" in capsys.readouterr().err


def test_without_a_key_nothing_is_sent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from orchestrator_site.cli import app

    monkeypatch.delenv("ORCHESTRATOR_API_KEY", raising=False)
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n')
    result = CliRunner().invoke(app, ["batch", "submit", str(path)])
    assert result.exit_code == 2 and "ORCHESTRATOR_API_KEY is not set" in result.output
    assert "batch" in CliRunner().invoke(app, ["--help"]).output
