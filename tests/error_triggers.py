"""Every error class of the tree is raised by code under test somewhere in the suite.

A class counts as triggered when the project's own code (``orchestrator_site``,
``pipeline``, ``batches``, ``workers``) constructs it: that is where an error is raised,
or built to cross a boundary as an error event. A test, a parametrize table, or
``OrchestratorError.from_dict`` rebuilding an error that came over the wire does
not count. When the whole suite has passed, a class never triggered fails it.

``ERROR_TRIGGER_CHECK`` (a dotted module) makes any run check the classes defined
in that module alone: the suite's own test of this check plants a class there.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import FrameType

import pytest

from orchestrator_site import errors

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("orchestrator_site", "pipeline", "batches", "workers")
ERRORS_FILE = errors.__file__
# Categories that are only ever raised through a subclass.
ABSTRACT = {errors.AuthenticationFailed, errors.WorkerError}
RAISED: set[type[errors.OrchestratorError]] = set()
_original_init = errors.OrchestratorError.__init__


def constructed_by_code_under_test(frame: FrameType | None) -> bool:
    """Whether the construction whose caller is ``frame`` was made by the project's code."""
    if frame is None or frame.f_code.co_filename == ERRORS_FILE:
        return False  # from_dict: an error raised elsewhere, rebuilt
    try:
        parts = Path(frame.f_code.co_filename).resolve().relative_to(ROOT).parts
    except ValueError:
        return False  # a library's
    return bool(parts) and parts[0] in PACKAGES


def _recording_init(self: errors.OrchestratorError, *args: object, **kwargs: object) -> None:
    if constructed_by_code_under_test(sys._getframe(1)):
        RAISED.add(type(self))
    _original_init(self, *args, **kwargs)  # type: ignore[arg-type]


errors.OrchestratorError.__init__ = _recording_init  # type: ignore[method-assign]


def untriggered(classes: list[type[errors.OrchestratorError]]) -> list[str]:
    return sorted(k.__name__ for k in classes if k not in RAISED and k not in ABSTRACT)


def checked_classes(config: pytest.Config) -> list[type[errors.OrchestratorError]] | None:
    """The classes this run must have triggered: the module named by
    ``ERROR_TRIGGER_CHECK``'s, else the whole tree when the whole suite ran, else none."""
    planted = os.environ.get("ERROR_TRIGGER_CHECK")
    if planted:
        module = importlib.import_module(planted)
        return [k for k in vars(module).values() if isinstance(k, type) and issubclass(k, errors.OrchestratorError) and k.__module__ == planted]
    whole_suite = not config.option.keyword and not config.option.markexpr and [str(a) for a in config.args] in (["tests"], [])
    return errors.all_error_classes() if whole_suite else None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """When the run passed, fail it if an error class was never triggered."""
    classes = checked_classes(session.config)
    if exitstatus != 0 or classes is None:
        return
    missing = untriggered(classes)
    if missing:
        session.config.get_terminal_writer().line(f"error classes never triggered by code under test: {', '.join(missing)}", red=True)
        session.exitstatus = 1
