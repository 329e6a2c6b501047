"""The regression gate catches an injected 20 % slowdown and stays green on an unchanged tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# One gate run is three side-by-side comparisons of ~8 s on a quiet machine; a
# slowdown is confirmed twice more and a disturbed run is repeated, so on a busy
# CI host the 120 s default was seen to cut a correct run short.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PACKAGES = ("orchestrator_site", "pipeline", "workers", "batches")

SLOWDOWN = """

# --- injected by test_bench_gate: every second call does the work twice (+50 % of assemble's own work) ---
_assemble_once = assemble
_calls = [0]


def assemble(ctx, *, config):  # type: ignore[no-redef]
    _calls[0] += 1
    if _calls[0] % 2 == 0:
        _assemble_once(ctx, config=config)
    return _assemble_once(ctx, config=config)
"""


def copy_tree(into: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, into / package, ignore=shutil.ignore_patterns("__pycache__"))
    return into


def gate(base: Path, head: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/bench_gate.py", "--base-tree", str(base), "--head-tree", str(head), "--pairs", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )


CONTROLS = ("rag.limit_context", "post (2 KiB reply)")  # cases the injection does not touch


def disturbed(stdout: str) -> bool:
    """A run in which the untouched cases moved by more than 10 % was disturbed by the
    shared machine (seen once in CI: every base case 20 % slower); it says nothing."""
    for line in stdout.splitlines():
        if line.startswith(CONTROLS) and "%" in line:
            change = float(line.split()[-2 if "REGRESSION" in line else -1].rstrip("%"))
            if abs(change) > 10:
                return True
    return False


def test_an_injected_slowdown_fails_the_gate(tmp_path: Path) -> None:
    base = copy_tree(tmp_path / "base")
    head = copy_tree(tmp_path / "head")
    with (head / "pipeline" / "stages" / "assemble.py").open("a") as f:
        f.write(SLOWDOWN)
    for _ in range(3):
        proc = gate(base, head)
        if not disturbed(proc.stdout):
            break
    assert not disturbed(proc.stdout), proc.stdout
    assert proc.returncode == 1, proc.stdout
    flagged = [line for line in proc.stdout.splitlines() if "REGRESSION" in line]
    assert any(line.startswith("assemble") for line in flagged), proc.stdout


def test_disturbed_runs_are_recognised() -> None:
    calm = "rag.limit_context (50 docs)   4.6   4.7   +2.0%\npost (2 KiB reply)   170.0   171.0   +0.6%\nassemble   12.0   14.8  +23.3%  REGRESSION"
    noisy = "rag.limit_context (50 docs)   6.45   4.93  -23.6%\npost (2 KiB reply)   230.5   184.3  -20.0%"
    assert not disturbed(calm) and disturbed(noisy)


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_an_unchanged_tree_passes(tmp_path: Path, attempt: int) -> None:
    base = copy_tree(tmp_path / "base")
    proc = gate(base, ROOT)
    for _ in range(2):
        if proc.returncode == 0 or not disturbed(proc.stdout):
            break
        proc = gate(base, ROOT)  # the machine, not the code, moved the controls
    assert proc.returncode == 0, proc.stdout
    assert "bench gate: ok" in proc.stdout


def test_a_missing_base_ref_is_not_a_failure() -> None:
    proc = subprocess.run([sys.executable, "scripts/bench_gate.py", "--base-ref", "no-such-ref"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "no base tree" in proc.stdout
