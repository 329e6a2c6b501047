"""The pre-commit gate, its installer and the coverage floors, each against a planted violation."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("orchestrator_site", "pipeline", "workers", "batches")


def copy_project(into: Path) -> Path:
    for package in (*PACKAGES, "tests"):
        shutil.copytree(ROOT / package, into / package, ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
    for name in ("pyproject.toml", "manage.py"):
        shutil.copy(ROOT / name, into / name)
    return into


@pytest.mark.slow
def test_pre_commit_passes_a_clean_tree_and_fails_a_planted_lint_error(tmp_path: Path) -> None:
    root = copy_project(tmp_path / "project")
    clean = subprocess.run(["bash", "scripts/pre_commit.sh", "--no-tests", str(root)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "pre-commit: ok" in clean.stdout
    (root / "pipeline" / "planted.py").write_text("import os\n")  # unused import: ruff F401
    dirty = subprocess.run(["bash", "scripts/pre_commit.sh", "--no-tests", str(root)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert dirty.returncode != 0 and "F401" in dirty.stdout + dirty.stderr
    assert "pre-commit: ok" not in dirty.stdout


@pytest.mark.slow
def test_pre_commit_fails_on_a_type_error(tmp_path: Path) -> None:
    root = copy_project(tmp_path / "project")
    (root / "workers" / "planted.py").write_text("from __future__ import annotations\n\n\ndef f(x: int) -> str:\n    return x\n")
    proc = subprocess.run(["bash", "scripts/pre_commit.sh", "--no-tests", str(root)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "workers/planted.py" in proc.stdout + proc.stderr


def test_install_hooks_installs_an_executable_pre_commit_hook(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    shutil.copy(ROOT / "scripts" / "install_hooks.sh", clone / "scripts" / "install_hooks.sh")
    proc = subprocess.run(["bash", "scripts/install_hooks.sh"], cwd=clone, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    hook = clone / ".git" / "hooks" / "pre-commit"
    assert hook.stat().st_mode & stat.S_IXUSR
    assert "scripts/pre_commit.sh" in hook.read_text()


def make_package(root: Path) -> None:
    pkg = root / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(
        textwrap.dedent(
            """
        def used(x):
            if x:
                return 1
            return 2


        def unused():
            return 3
        """
        )
    )
    (root / "run.py").write_text("from pkg.mod import used\nused(True)\n")


def test_coverage_floor_fails_below_and_passes_above(tmp_path: Path) -> None:
    make_package(tmp_path)
    env = {**os.environ, "COVERAGE_FILE": str(tmp_path / ".coverage")}
    env.pop("COVERAGE_PROCESS_START", None)
    subprocess.run(
        [sys.executable, "-m", "coverage", "run", "--branch", "--source=pkg", "--rcfile=/dev/null", "run.py"], cwd=tmp_path, env=env, check=True, timeout=60
    )
    check = [sys.executable, str(ROOT / "scripts" / "coverage_check.py"), "--data-file", str(tmp_path / ".coverage")]
    low = subprocess.run([*check, "--floor", "90", "pkg"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert low.returncode == 1 and "FAILED" in low.stdout
    high = subprocess.run([*check, "--floor", "40", "pkg"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert high.returncode == 0, high.stdout
    missing = subprocess.run([*check, "--floor", "1", "pkg", "nothing_here"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "coverage of nothing_here: 0.0%" in missing.stdout
