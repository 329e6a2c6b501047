"""``scripts/mutation.sh``: mutmut over the core files given, the kill rate per module,
and the gate. A planted weak test (a backoff test whose assertions were loosened)
lets most mutants of ``backoff`` live, and the gate fails naming the module."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import ROOT

WEAK = """
import random

from pipeline.resilience.backoff import BackoffPolicy, backoff_ceiling, retry_delay


def test_backoff_gives_numbers() -> None:  # loosened: any number passes
    assert backoff_ceiling(BackoffPolicy(), 2) >= 0
    assert retry_delay(BackoffPolicy(), 0, retry_after=None, rng=random.Random(1)) is not None
"""


def mutation(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "scripts/mutation.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_the_gate_fails_on_a_planted_weak_test(tmp_path: Path) -> None:
    weak = tmp_path / "test_weak_backoff.py"
    weak.write_text(textwrap.dedent(WEAK))
    run = mutation("pipeline/resilience/backoff.py", "--gate", "--work", str(tmp_path / "work"), "--tests", str(weak))
    lines = run.stdout.splitlines()
    assert run.returncode == 1, run.stdout + run.stderr
    assert lines[-2] == "mutation gate: FAILED: under 80 %: pipeline.resilience.backoff"
    assert lines[-1].startswith("mutation: killed ")  # the run ends with the summary
    killed, total = (int(n) for n in lines[-1].split()[2:5:2])
    assert total > 0 and killed / total < 0.8
    assert any("__mutmut_" in line and "(survived)" in line for line in lines)  # the survivors are named
    assert not (ROOT / "mutants").exists()  # the tree is left alone: mutmut ran in the work directory


def test_only_core_files_are_taken_and_no_change_is_no_run(tmp_path: Path) -> None:
    outside = mutation("--work", str(tmp_path / "work"), "pipeline/api/views.py")
    assert outside.returncode == 2 and "not core files" in outside.stderr
    unchanged = mutation("--changed", "--base-ref", "HEAD", "--gate", "--work", str(tmp_path / "work"))
    assert unchanged.returncode == 0 and unchanged.stdout.strip() == "mutation: no core file changed"


def test_the_real_backoff_tests_pass_the_gate(tmp_path: Path) -> None:
    run = mutation("pipeline/resilience/backoff.py", "--gate", "--work", str(tmp_path / "work"), "--tests", str(ROOT / "tests/pipeline/test_retry.py"))
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.rstrip().splitlines()
    assert "| pipeline.resilience.backoff | " in run.stdout and lines[-2] == "mutation gate: ok"
    killed, total = (int(n) for n in lines[-1].split()[2:5:2])
    assert killed / total >= 0.8
