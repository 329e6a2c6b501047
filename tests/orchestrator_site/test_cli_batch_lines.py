"""The lines ``orchestrator batch submit`` reads, in process: prompt lines become the
API's prompts and OpenAI batch request lines its requests, one kind per file,
destinations from ``--to``; and each refusal names its line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st

from orchestrator_site.cli_batch import destination_of, item_of, read_items


def openai_line(content: object, *, url: str = "/v1/chat/completions", model: str = "echo-1", role: str = "user") -> str:
    body = {"model": model, "messages": [{"role": role, "content": content}]}
    return json.dumps({"custom_id": "r", "method": "POST", "url": url, "body": body})


@pytest.mark.parametrize(
    ("line", "item"),
    [
        ('{"prompt": "hi"}', ("prompts", {"prompt": "hi"})),
        ('{"prompt": "hi", "custom_id": "a-1"}', ("prompts", {"prompt": "hi", "custom_id": "a-1"})),
        (openai_line("hello"), ("requests", json.loads(openai_line("hello")))),
        # A request line goes as written, whatever it holds: the gateway checks it and names what is wrong.
        (openai_line("hi", role="system", url="/v1/embeddings"), ("requests", json.loads(openai_line("hi", role="system", url="/v1/embeddings")))),
        (json.dumps({"url": "/v1/chat/completions"}), ("requests", {"url": "/v1/chat/completions"})),
    ],
)
def test_a_line_becomes_a_prompt_or_a_request(line: str, item: tuple[str, dict[str, object]]) -> None:
    assert item_of(line, 1) == item


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("nope", "line 7: not JSON"),
        ('"a string"', "line 7: must be a JSON object"),
        ('{"custom_id": "x"}', 'line 7: needs "prompt", or an OpenAI batch request'),
        ('{"messages": []}', 'line 7: needs "prompt"'),
    ],
)
def test_a_bad_line_is_named(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        item_of(line, 7)


@given(text=st.text(min_size=1), custom_id=st.text(max_size=64))
def test_any_prompt_line_is_passed_on_as_written(text: str, custom_id: str) -> None:
    assert item_of(json.dumps({"prompt": text, "custom_id": custom_id}), 1) == ("prompts", {"prompt": text, "custom_id": custom_id})


def test_a_file_skips_blank_lines_and_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('\ufeff{"prompt": "a"}\n\n   \n{"prompt": "b"}\n', encoding="utf-8")
    assert read_items(path) == ("prompts", [{"prompt": "a"}, {"prompt": "b"}])
    path.write_text(f"{openai_line('b')}\n\n{openai_line('c', model='m-2')}\n")
    kind, items = read_items(path)
    assert kind == "requests" and [i["body"]["messages"][0]["content"] for i in items] == ["b", "c"]  # two models: the gateway says so


@pytest.mark.parametrize(
    ("text", "message"), [(f'{{"prompt": "a"}}\n{openai_line("b")}\n', "one kind of line per file"), ("\n  \n", "the file has no prompts")]
)
def test_a_file_that_cannot_be_one_job_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_items(path)


def test_a_bad_line_deep_in_a_file_is_named_by_its_number(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{oops\n')
    with pytest.raises(ValueError, match="line 4: not JSON"):
        read_items(path)


def test_destinations_from_to(capsys: pytest.CaptureFixture[str]) -> None:
    assert destination_of("file://runs/a.jsonl") == {"kind": "file", "path": "runs/a.jsonl"}
    # The path as written: the gateway checks it (relative, under its output directory).
    assert destination_of("file://a b.jsonl") == {"kind": "file", "path": "a b.jsonl"}
    assert destination_of("file:///abs.jsonl") == {"kind": "file", "path": "/abs.jsonl"}
    assert destination_of("https://example.com/hook") == {"kind": "webhook", "url": "https://example.com/hook"}
    assert destination_of("http://10.0.0.5/in") == {"kind": "webhook", "url": "http://10.0.0.5/in"}  # the gateway refuses it, naming why
    assert destination_of("s3://results/runs/") == {"kind": "s3", "bucket": "results", "prefix": "runs/"}
    assert destination_of("s3://results") == {"kind": "s3", "bucket": "results", "prefix": ""}
    for target in ("file://", "s3://", "ftp://host/x"):
        with pytest.raises(typer.Exit) as refused:
            destination_of(target)
        assert refused.value.exit_code == 2
        assert f"--to {target}: file://PATH (under the gateway's batch.output_dir), s3://BUCKET/PREFIX or an http(s):// webhook URL" in capsys.readouterr().err


def test_without_a_key_nothing_is_sent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from orchestrator_site.cli import app

    monkeypatch.delenv("ORCHESTRATOR_API_KEY", raising=False)
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n')
    result = CliRunner().invoke(app, ["batch", "submit", str(path)])
    assert result.exit_code == 2 and "ORCHESTRATOR_API_KEY is not set" in result.output
    assert "batch" in CliRunner().invoke(app, ["--help"]).output
