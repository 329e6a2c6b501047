from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from django.test import override_settings

from pipeline.checks import pipeline_config_check

ROOT = Path(__file__).resolve().parents[2]


def test_valid_or_absent_config_passes(tmp_path: Path) -> None:
    with override_settings(PIPELINE_CONFIG_PATH=str(tmp_path / "absent.toml")):
        assert pipeline_config_check() == []


def test_invalid_config_is_a_check_error(tmp_path: Path) -> None:
    bad = tmp_path / "pipeline.toml"
    bad.write_text("[rag]\ntop_k = -1\n")
    with override_settings(PIPELINE_CONFIG_PATH=str(bad)):
        (error,) = pipeline_config_check()
    assert error.id == "pipeline.E001" and "rag.top_k" in error.msg and "pipeline.example.toml" in (error.hint or "")


def test_manage_py_check_fails_on_a_bad_pipeline_toml(tmp_path: Path) -> None:
    bad = tmp_path / "pipeline.toml"
    bad.write_text('default_worker = "ghost"\n')
    proc = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env={**os.environ, "PIPELINE_CONFIG": str(bad)}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "pipeline.E001" in proc.stderr and f'{bad}:1: default_worker: "ghost" is not a worker; the workers are "echo"' in proc.stderr


def test_the_check_is_registered_with_django() -> None:
    from django.core import checks

    assert pipeline_config_check in checks.registry.registry.get_checks()


def test_the_example_file_passes_the_check() -> None:
    with override_settings(PIPELINE_CONFIG_PATH=str(ROOT / "pipeline.example.toml")):
        assert pipeline_config_check() == []


def test_the_check_lists_every_problem_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "pipeline.toml"
    bad.write_text('[rag]\ntop_k = 0\n[limits]\nmax_prompt_chars = "lots"\n[workers.echo]\nkind = "echo"\nfallback = "ghost"\n')
    with override_settings(PIPELINE_CONFIG_PATH=str(bad)):
        (error,) = pipeline_config_check()
    assert error.msg.splitlines() == [
        f"{bad}:2: rag.top_k: 0 is too small: the least allowed is 1",
        f'{bad}:4: limits.max_prompt_chars: "lots" is not an integer',
        f'{bad}:7: workers.echo.fallback: "ghost" is not a worker; there is no other worker',
    ]
    assert "orchestrator validate" in (error.hint or "")
