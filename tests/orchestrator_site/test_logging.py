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
    structlog.get_logger("t").info("stage", text="héllo 世界", quote='"', newline="a\nb", number=1.5, none=None)
    line = json.loads(capsys.readouterr().err.strip())
    assert (line["text"], line["quote"], line["newline"], line["number"], line["none"]) == ("héllo 世界", '"', "a\nb", 1.5, None)
