"""Redaction patterns: built-in, configured, and the replacement text."""

from __future__ import annotations

import pytest

from pipeline.config import PostprocessConfig, RedactionPattern
from pipeline.stages.postprocess import API_KEY, EMAIL, build_filter, filter_text, patterns_for


def run(text: str, config: PostprocessConfig) -> str:
    return filter_text([text], build_filter(config, ())).text


@pytest.mark.parametrize(
    "secret",
    [
        "sk-proj-abcdefghijklmnop1234",
        "sk_live_abcdefghijklmnopqrst",
        "pk-abcdefghijklmnopqr",
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_" + "a1" * 18,
        "xoxb-1234567890-abcdef",
        "po_1a2b3c4d_" + "Z" * 43,
    ],
)
def test_key_like_strings_are_redacted(secret: str) -> None:
    assert run(f"key: {secret} end", PostprocessConfig()) == "key: [REDACTED] end"


@pytest.mark.parametrize("text", ["sk-short", "task-force", "AKIA123", "skate-park", "ask-me-anything"])
def test_ordinary_words_are_left_alone(text: str) -> None:
    assert run(text, PostprocessConfig()) == text


@pytest.mark.parametrize("email", ["a@b.io", "first.last+tag@sub.example.co.uk", "x_y-z%1@host-name.org"])
def test_emails_are_redacted(email: str) -> None:
    assert run(f"<{email}>", PostprocessConfig()) == "<[REDACTED]>"


def test_not_emails() -> None:
    for text in ("user@localhost", "@handle", "a@b", "1.5@2"):
        assert run(text, PostprocessConfig()) == text


def test_patterns_for_respects_the_switches() -> None:
    assert patterns_for(PostprocessConfig()) == (EMAIL, API_KEY)
    assert patterns_for(PostprocessConfig(redact_emails=False)) == (API_KEY,)
    custom = RedactionPattern(name="phone", pattern=r"\+\d{11}", max_length=12)
    assert patterns_for(PostprocessConfig(redact_api_keys=False, patterns=(custom,))) == (EMAIL, custom)


def test_custom_replacement_and_several_matches() -> None:
    config = PostprocessConfig(replacement="<hidden>", patterns=(RedactionPattern(name="phone", pattern=r"\+\d{11}", max_length=12),))
    assert run("call +14155550123 or mail a@b.io", config) == "call <hidden> or mail <hidden>"


def test_a_stop_inside_a_secret_stops_before_it() -> None:
    assert run("my key sk-abcdefSTOPghijklmnopqr", PostprocessConfig(stop=("STOP",))) == "my key sk-abcdef"
