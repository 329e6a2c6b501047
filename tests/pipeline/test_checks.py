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
    assert "pipeline.E001" in proc.stderr and "default_worker 'ghost'" in proc.stderr


def test_the_check_is_registered_with_django() -> None:
    from django.core import checks

    assert pipeline_config_check in checks.registry.registry.get_checks()


def test_the_example_file_passes_the_check() -> None:
    with override_settings(PIPELINE_CONFIG_PATH=str(ROOT / "pipeline.example.toml")):
        assert pipeline_config_check() == []
