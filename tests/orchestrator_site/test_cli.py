"""``orchestrator``, run as installed (the console script of pyproject.toml)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config.reference import json_schema_text, markdown

SCRIPT = Path(sys.executable).parent / "orchestrator"
EXAMPLE = Path(__file__).resolve().parents[2] / "pipeline.example.toml"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("command", [[], ["validate"], ["schema"], ["explain"]], ids=["orchestrator", "validate", "schema", "explain"])
def test_every_command_has_help(command: list[str]) -> None:
    done = run(*command, "--help")
    assert done.returncode == 0, done.stderr
    assert "Usage: orchestrator" in done.stdout
    if not command:
        assert all(name in done.stdout for name in ("validate", "schema", "explain"))


def test_validate_a_valid_file_exits_0() -> None:
    done = run("validate", str(EXAMPLE))
    assert (done.returncode, done.stdout) == (0, f"{EXAMPLE}: valid\n")


def test_validate_an_invalid_file_prints_every_problem_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "pipeline.toml"
    bad.write_text("[rag]\ntop_k = 0\ntimout_ms = 5\n", encoding="utf-8")
    done = run("validate", str(bad))
    assert done.returncode == 1
    assert done.stdout == (f'{bad}:2: rag.top_k: 0 is too small: the least allowed is 1\n{bad}:3: rag.timout_ms: unknown key; did you mean "timeout_ms"?\n')
    assert done.stderr == "2 problems\n"


def test_validate_as_json(tmp_path: Path) -> None:
    bad = tmp_path / "pipeline.toml"
    bad.write_text("[rag]\ntop_k = 0\n", encoding="utf-8")
    done = run("validate", str(bad), "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout) == {
        "file": str(bad),
        "valid": False,
        "problems": [{"path": "rag.top_k", "message": "0 is too small: the least allowed is 1", "line": 2}],
    }
    good = run("validate", str(EXAMPLE), "--json")
    assert good.returncode == 0 and json.loads(good.stdout) == {"file": str(EXAMPLE), "valid": True, "problems": []}


def test_validate_a_missing_or_unreadable_file(tmp_path: Path) -> None:
    missing = run("validate", str(tmp_path / "nope.toml"))
    assert missing.returncode == 1 and missing.stdout == f"{tmp_path / 'nope.toml'}: no such file\n"
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff")
    done = run("validate", str(binary))
    assert done.returncode == 1 and done.stdout == f"{binary}: not UTF-8 text: invalid start byte at byte 0\n"


def test_schema_prints_the_json_schema_and_the_reference() -> None:
    done = run("schema")
    assert done.returncode == 0 and done.stdout == json_schema_text()
    page = run("schema", "--markdown")
    assert page.returncode == 0 and page.stdout == markdown()


def test_explain_describes_a_file_and_refuses_an_invalid_one(tmp_path: Path) -> None:
    done = run("explain", str(EXAMPLE))
    assert done.returncode == 0
    assert done.stdout.startswith('Pipeline "default", version 1\n\nWorkers (a request that names none goes to echo)\n')
    assert "  local: llamacpp at http://127.0.0.1:8081; models smollm2-135m (default)" in done.stdout
    assert "\nWarnings\n" in done.stdout
    bad = tmp_path / "pipeline.toml"
    bad.write_text('default_worker = "nope"\n', encoding="utf-8")
    refused = run("explain", str(bad))
    assert refused.returncode == 1 and refused.stdout == f'{bad}:1: default_worker: "nope" is not a worker; the workers are "echo"\n'


def test_an_unknown_command_is_a_usage_error() -> None:
    done = run("frobnicate")
    assert done.returncode == 2 and "No such command" in done.stderr
