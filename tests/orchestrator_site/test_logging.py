from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from orchestrator_site.logging import configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()
    configure_logging(level="WARNING", fmt="console")


def test_json_format_gives_one_json_object_per_line(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(level="INFO", fmt="json")
    structlog.get_logger("t").info("stage", stage="rag", duration_us=12, outcome="ok")
    logging.getLogger("django").warning("plain %s", "stdlib")
    lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    assert lines[0]["event"] == "stage" and lines[0]["stage"] == "rag" and lines[0]["level"] == "info"
    assert lines[1]["event"] == "plain stdlib" and lines[1]["logger"] == "django"
    assert all("timestamp" in line for line in lines)


def test_level_filters_and_httpx_is_quiet(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(level="WARNING", fmt="json")
    structlog.get_logger("t").info("hidden")
    logging.getLogger("httpx").info("HTTP Request: POST https://api.example.com")
    assert capsys.readouterr().err == ""


def test_console_format_is_readable(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(level="INFO", fmt="console")
    structlog.get_logger("t").info("hello", stage="post")
    err = capsys.readouterr().err
    assert "hello" in err and "stage=post" in err


def test_exceptions_are_rendered_into_the_json_line(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(level="INFO", fmt="json")
    try:
        raise ValueError("kaput")
    except ValueError:
        structlog.get_logger("t").exception("task_crashed", request_id="r1")
    line = json.loads(capsys.readouterr().err.strip())
    assert line["event"] == "task_crashed" and line["level"] == "error" and line["request_id"] == "r1"
    assert "ValueError: kaput" in line["exception"]


def test_context_variables_join_every_line(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(level="INFO", fmt="json")
    structlog.contextvars.bind_contextvars(request_id="ctx-1")
    try:
        structlog.get_logger("t").info("one")
        logging.getLogger("celery").info("two")
    finally:
        structlog.contextvars.clear_contextvars()
    lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    assert [line["request_id"] for line in lines] == ["ctx-1", "ctx-1"]


def test_configuring_twice_keeps_one_handler(restore_logging: None) -> None:
    configure_logging(level="INFO", fmt="json")
    configure_logging(level="INFO", fmt="json")
    assert len(logging.getLogger().handlers) == 1


def test_celery_and_django_loggers_share_the_format(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(level="INFO", fmt="json")
    for name in ("celery.worker", "django.request", "pipeline"):
        logging.getLogger(name).warning("from %s", name)
    lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    assert [(line["logger"], line["event"], line["level"]) for line in lines] == [
        ("celery.worker", "from celery.worker", "warning"),
        ("django.request", "from django.request", "warning"),
        ("pipeline", "from pipeline", "warning"),
    ]


def test_non_ascii_and_odd_values_stay_valid_json(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(level="INFO", fmt="json")
    structlog.get_logger("t").info("stage", title="héllo 世界", quote='"', newline="a\nb", number=1.5, none=None)
    line = json.loads(capsys.readouterr().err.strip())
    assert (line["title"], line["quote"], line["newline"], line["number"], line["none"]) == ("héllo 世界", '"', "a\nb", 1.5, None)


KEY = "po_1a2b3c4d_" + "Q" * 43
PLANTED = {"prompt": "my secret medical question", "authorization": f"Bearer {KEY}", "text": "the model's private answer"}


def test_sensitive_fields_and_planted_secrets_never_reach_a_line(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(level="INFO", fmt="json")
    log = structlog.get_logger("t")
    log.info("stage", stage="post", **PLANTED)
    log.info("nested", data={"messages": [{"role": "user", "content": "hidden"}], "note": f"key {KEY} in a note"}, headers=["Bearer abcdefgh12345678"])
    logging.getLogger("django.request").warning("got %s and sk-proj-abcdefghijklmnop1234", KEY)
    try:
        raise ValueError(f"failed with {KEY}")
    except ValueError:
        log.exception("crash")
    out = capsys.readouterr().err
    for secret in ("my secret medical question", "private answer", "hidden", KEY, "abcdefgh12345678", "sk-proj-abcdefghijklmnop1234"):
        assert secret not in out, secret
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert lines[0]["prompt"] == "[REDACTED]" and lines[0]["stage"] == "post"
    assert lines[1]["data"]["messages"] == "[REDACTED]" and lines[1]["data"]["note"] == "key [REDACTED] in a note"
    assert "[REDACTED]" in lines[2]["event"] and "[REDACTED]" in lines[3]["exception"]


def test_ordinary_fields_are_left_alone(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(level="INFO", fmt="json")
    structlog.get_logger("t").info("stage", stage="rag", request_id="abc123", duration_us=42, outcome="hit", worker="openai")
    line = json.loads(capsys.readouterr().err)
    assert (line["stage"], line["request_id"], line["duration_us"], line["outcome"], line["worker"]) == ("rag", "abc123", 42, "hit", "openai")


def test_scrub_walks_every_container_and_ignores_case() -> None:
    from orchestrator_site.logging import REDACTED, _scrub, redact

    assert _scrub(("x", [f"Bearer {'t' * 12}"], {"Prompt": "p", "n": 3})) == ["x", [REDACTED], {"Prompt": REDACTED, "n": 3}]
    assert _scrub(5) == 5 and _scrub(None) is None and _scrub("plain words") == "plain words"
    event = redact(None, "info", {"event": "e", "API_KEY": "k", "Messages": [], "tenant": "acme"})
    assert event == {"event": "e", "API_KEY": REDACTED, "Messages": REDACTED, "tenant": "acme"}


@pytest.mark.parametrize("secret", ["AKIAIOSFODNN7EXAMPLE", "rk_live_0123456789abcdefgh", "Bearer eyJhbGciOi.payload.sig"])
def test_credentials_inside_free_text_are_caught(secret: str) -> None:
    from orchestrator_site.logging import SECRET_PATTERN

    assert SECRET_PATTERN.sub("X", f"before {secret} after") == "before X after"


def test_the_development_format_is_redacted_too(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(level="INFO", fmt="console")
    structlog.get_logger("t").info("stage", prompt="do not print me", note=f"key {KEY}")
    err = capsys.readouterr().err
    assert "do not print me" not in err and KEY not in err
    assert "prompt=[REDACTED]" in err
