"""The error meta-test counts a class only when code under test raised it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from orchestrator_site.errors import OrchestratorError, Overloaded, PromptMissing
from pipeline.services import gates
from tests import error_triggers
from tests.conftest import ROOT


def test_an_error_a_test_builds_is_not_counted() -> None:
    was = Overloaded in error_triggers.RAISED
    error_triggers.RAISED.discard(Overloaded)
    try:
        Overloaded("built by a test")
        assert Overloaded not in error_triggers.RAISED
        assert error_triggers.untriggered([Overloaded, PromptMissing]) == sorted(
            ["Overloaded"] + ([] if PromptMissing in error_triggers.RAISED else ["PromptMissing"])
        )
    finally:
        if was:
            error_triggers.RAISED.add(Overloaded)


def test_an_error_the_code_under_test_raises_is_counted() -> None:
    error_triggers.RAISED.discard(Overloaded)
    assert isinstance(gates.shed("global", max_global=1, max_per_tenant=1), Overloaded)
    assert Overloaded in error_triggers.RAISED


def test_an_error_rebuilt_from_the_wire_is_not_counted() -> None:
    was = PromptMissing in error_triggers.RAISED
    error_triggers.RAISED.discard(PromptMissing)
    try:
        assert type(OrchestratorError.from_dict({"code": "prompt_missing", "message": "m"})) is PromptMissing
        assert PromptMissing not in error_triggers.RAISED
    finally:
        if was:
            error_triggers.RAISED.add(PromptMissing)


def test_a_planted_class_nothing_raises_fails_the_run(tmp_path: Path) -> None:
    """A run of a tiny suite, checking a planted class: the suite's tests pass, and the
    run fails all the same, naming the class."""
    (tmp_path / "planted_errors.py").write_text(
        textwrap.dedent(
            """
            from orchestrator_site.errors import OrchestratorError

            class PlantedError(OrchestratorError):
                code = "planted"
            """
        )
    )
    (tmp_path / "test_planted.py").write_text(
        textwrap.dedent(
            """
            from planted_errors import PlantedError

            def test_builds_it_but_nothing_raises_it() -> None:
                assert PlantedError("constructed by the test").code == "planted"
            """
        )
    )
    env = {**os.environ, "ERROR_TRIGGER_CHECK": "planted_errors", "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.error_triggers", "--rootdir", str(tmp_path), str(tmp_path)]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "1 passed" in run.stdout, run.stdout + run.stderr
    assert run.returncode == 1 and "never triggered by code under test: PlantedError" in run.stdout
