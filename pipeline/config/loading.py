"""Reading a config: TOML text to a validated ``PipelineSettings``, or every problem
of the text at once (``ConfigInvalid``, its ``data["problems"]`` one dict each).

The text is validated in pydantic's strict mode, through JSON: TOML's types are
JSON's, so a string where a number belongs is an error rather than a number
parsed out of it, and an array is a valid tuple.
"""

from __future__ import annotations

import datetime
import json
import re
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from orchestrator_site.errors import ConfigInvalid
from pipeline.config.problems import Problem, key_lines, problems_of
from pipeline.config.schema import PipelineSettings

EMPTY = "the file is empty: remove it to run on the defaults, or give it settings (pipeline.example.toml shows them all)"


@dataclass(frozen=True, slots=True)
class Checked:
    """A config text's validation: the settings, or the problems (never both)."""

    settings: PipelineSettings | None
    problems: tuple[Problem, ...]


def _json_value(value: object) -> str:
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()  # a TOML date where none belongs: reported as a string
    raise TypeError(type(value).__name__)


def check_text(text: str) -> Checked:
    """Validate a config's text, collecting every problem."""
    if not text.strip():
        return Checked(None, (Problem("", EMPTY),))
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return Checked(None, (toml_problem(exc, text),))
    try:
        settings = PipelineSettings.model_validate_json(json.dumps(raw, default=_json_value), strict=True)
    except ValidationError as exc:
        return Checked(None, tuple(problems_of(exc, raw, key_lines(text))))
    return Checked(settings, ())


def toml_problem(exc: tomllib.TOMLDecodeError, text: str) -> Problem:
    """tomllib's message ends with "(at line L, column C)" or "(at end of document)":
    the line goes where every problem's line goes."""
    message = str(exc)
    found = re.search(r"\(at (?:line (\d+), column (\d+)|end of document)\)$", message)
    if found is None:
        return Problem("", f"not valid TOML: {message}")
    reason = message[: found.start()].strip()
    reason = f"{reason[:1].lower()}{reason[1:]}"
    if found.group(1) is None:
        return Problem("", f"not valid TOML: {reason} at the end of the file", len(text.splitlines()) or 1)
    return Problem("", f"not valid TOML: {reason} (column {found.group(2)})", int(found.group(1)))


def parse_config(text: str, *, source: str) -> PipelineSettings:
    """The settings of ``text``, or ``ConfigInvalid`` naming ``source`` with every problem."""
    checked = check_text(text)
    if checked.settings is None:
        raise invalid(source, checked.problems)
    return checked.settings


def invalid(source: str, problems: tuple[Problem, ...]) -> ConfigInvalid:
    lines = [problem.render(source) for problem in problems]
    return ConfigInvalid("\n".join(lines), data={"file": source, "problems": [problem.to_dict() for problem in problems]})


def read_text(path: str | Path) -> str:
    """A config file's text; ``ConfigInvalid`` when it is not UTF-8 or cannot be read."""
    file = Path(path)
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(str(file), (Problem("", f"not UTF-8 text: {exc.reason} at byte {exc.start}"),)) from exc
    except OSError as exc:
        raise invalid(str(file), (Problem("", f"cannot be read: {exc.strerror or exc}"),)) from exc


def load_config(path: str | Path) -> PipelineSettings:
    """Read and validate a config file; a missing file means all defaults."""
    file = Path(path)
    if not file.exists():
        return PipelineSettings()
    return parse_config(read_text(file), source=str(file))


_lock = threading.Lock()
_cached: PipelineSettings | None = None
_version = 0  # the stored version the process runs (pipeline.config.versions); 0: none, the file's


def get_config() -> PipelineSettings:
    """The process-wide config: the active stored version once the process follows
    them (``pipeline.config.reload``), else loaded once from ``settings.PIPELINE_CONFIG_PATH``."""
    global _cached
    if _cached is None:
        from django.conf import settings

        with _lock:
            if _cached is None:
                _cached = _applied(load_config(settings.PIPELINE_CONFIG_PATH))
    return _cached


def config_version() -> int:
    """The stored version this process runs (0: not a stored one)."""
    return _version


def set_config(config: PipelineSettings | None, *, version: int = 0) -> None:
    """Replace (or with None, forget) the process-wide config. The hot-reload seam."""
    global _cached, _version
    with _lock:
        _cached = None if config is None else _applied(config)
        _version = version if config is not None else 0


def config_at(version: int) -> PipelineSettings:
    """The config of stored ``version``: what a request started on runs on to its end,
    though the process may have moved on. The process's own when it is that version,
    or when the version is 0 or no longer stored."""
    if version in (0, _version):
        return get_config()
    from pipeline.config.versions import stored_settings

    return stored_settings(version) or get_config()


def _applied(config: PipelineSettings) -> PipelineSettings:
    """What a config sets in the process itself, beyond what is read per request: log levels."""
    from django.conf import settings

    from orchestrator_site.logging import set_levels

    set_levels(root=config.logging.level or settings.LOG_LEVEL, loggers=config.logging.loggers)
    return config
