"""The gates themselves: each fails on a planted violation and passes on a clean tree."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import panic_scan
import ratio_check

PACKAGES = ("orchestrator_site", "pipeline", "workers", "batches")


def make_tree(tmp_path: Path, code: dict[str, str], tests: dict[str, str] | None = None) -> Path:
    for package in PACKAGES:
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / "tests" / package).mkdir(parents=True, exist_ok=True)
    for rel, text in {**code, **(tests or {})}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


def lines(n: int, prefix: str = "x") -> str:
    return "".join(f"{prefix}{i} = {i}\n" for i in range(n))


# --- ratio check --------------------------------------------------------------------------------
def test_ratio_counts_only_code_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text("# comment\n\n   \nx = 1\n    # indented comment\ny = 2  # trailing comment counts\n")
    assert ratio_check.count_lines(path) == 2


def test_ratio_passes_at_the_floor_and_fails_below(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = {f"{p}/m.py": lines(10) for p in PACKAGES}
    enough = {f"tests/{p}/test_m.py": lines(15) for p in PACKAGES}
    root = make_tree(tmp_path, code, enough)
    assert ratio_check.main(["--root", str(root)]) == 0
    (root / "tests" / "workers" / "test_m.py").write_text(lines(14))
    assert ratio_check.main(["--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "workers" in out and "1.40  < 1.5" in out and "FAILED" in out


def test_ratio_ignores_migrations(tmp_path: Path) -> None:
    code = {f"{p}/m.py": lines(2) for p in PACKAGES} | {"pipeline/migrations/0001_initial.py": lines(500)}
    root = make_tree(tmp_path, code, {f"tests/{p}/test_m.py": lines(3) for p in PACKAGES})
    assert ratio_check.main(["--root", str(root)]) == 0


def test_ratio_script_runs_on_the_project() -> None:
    proc = subprocess.run(["bash", "scripts/ratio_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.splitlines()[0].split() == ["module", "code", "tests", "ratio"]


# --- panic scan ---------------------------------------------------------------------------------
PLANTED = {
    "bare-except": "try:\n    x = 1\nexcept:\n    raise\n",
    "blind-except": "try:\n    x = 1\nexcept Exception:\n    raise\n",
    "swallowed-exception": "try:\n    x = 1\nexcept ValueError:\n    pass\n",
    "assert": "def f(x):\n    assert x\n    return x\n",
    "print": "print('hello')\n",
    "breakpoint": "breakpoint()\n",
}


@pytest.mark.parametrize("rule", sorted(PLANTED))
def test_panic_scan_catches_each_planted_violation(tmp_path: Path, rule: str) -> None:
    root = make_tree(tmp_path, {"pipeline/bad.py": PLANTED[rule]})
    findings = panic_scan.scan(root)
    expected = "blind-except" if rule == "bare-except" else rule
    assert [f.rule for f in findings] == [expected] and findings[0].path == Path("pipeline/bad.py")
    assert panic_scan.main(["--root", str(root)]) == 1


def test_a_marked_boundary_is_allowed_and_a_task_must_use_one(tmp_path: Path) -> None:
    services = """
    def execute(payload):
        try:
            return payload["x"]
        except Exception:  # task boundary: logged and answered
            return None
    """
    tasks = """
    from celery import shared_task
    from pipeline import services

    @shared_task
    def good(payload):
        services.execute(payload)

    @shared_task(name="x")
    def bad(payload):
        payload.clear()
    """
    root = make_tree(tmp_path, {"pipeline/services.py": services, "pipeline/tasks.py": tasks})
    findings = panic_scan.scan(root)
    assert [(f.rule, f.text.split()[1]) for f in findings] == [("task-without-boundary", "bad")]


def test_the_project_is_clean() -> None:
    # In a process of its own: CPython 3.11.7's ast keeps its recursion depth in
    # state shared by threads, and this test process has threads running (fake
    # servers, event loops): ast.parse here once failed with "AST constructor
    # recursion depth mismatch" on a clean file.
    scan = subprocess.run([sys.executable, str(ROOT / "scripts/panic_scan.py"), "--root", str(ROOT)], capture_output=True, text=True, timeout=120)
    assert scan.returncode == 0 and scan.stdout == "panic scan: 0 found\n", scan.stdout + scan.stderr


def test_panic_scan_script_runs_ruff_too(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"workers/w.py": "import sys\n\nsys.stdout.write('ok')\n"})
    clean = subprocess.run(["bash", str(ROOT / "scripts/panic_scan.sh"), str(root)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    (root / "workers" / "w.py").write_text("print('x')\n")
    dirty = subprocess.run(["bash", str(ROOT / "scripts/panic_scan.sh"), str(root)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert dirty.returncode == 1 and "T201" in dirty.stdout and "panic scan: 1 found" in dirty.stdout
