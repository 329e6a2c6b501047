"""The regression gate catches an injected 20 % slowdown and stays green on an unchanged tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

PACKAGES = ("orchestrator_site", "pipeline", "workers", "batches")

SLOWDOWN = """

# --- injected by test_bench_gate: every fifth call does the work twice (+20 %) ---
_assemble_once = assemble
_calls = [0]


def assemble(ctx, *, config):  # type: ignore[no-redef]
    _calls[0] += 1
    if _calls[0] % 5 == 0:
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
        timeout=600,
    )


def test_an_injected_20_percent_slowdown_fails_the_gate(tmp_path: Path) -> None:
    base = copy_tree(tmp_path / "base")
    head = copy_tree(tmp_path / "head")
    with (head / "pipeline" / "stages" / "assemble.py").open("a") as f:
        f.write(SLOWDOWN)
    proc = gate(base, head)
    assert proc.returncode == 1, proc.stdout
    flagged = [line for line in proc.stdout.splitlines() if "REGRESSION" in line]
    assert any(line.startswith("assemble") for line in flagged), proc.stdout


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_an_unchanged_tree_passes(tmp_path: Path, attempt: int) -> None:
    proc = gate(copy_tree(tmp_path / "base"), ROOT)
    assert proc.returncode == 0, proc.stdout
    assert "bench gate: ok" in proc.stdout


def test_a_missing_base_ref_is_not_a_failure() -> None:
    proc = subprocess.run([sys.executable, "scripts/bench_gate.py", "--base-ref", "no-such-ref"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "no base tree" in proc.stdout
