"""``scripts/quiet-pip``: setup's pip says what matters and nothing else. A local index
directory without the package (as this machine's pip.conf has two) makes pip warn once
per package; the script drops exactly those notes and keeps pip's errors and status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PIP = [sys.executable, "-m", "pip"]


def pip_in(index: Path, *, quiet: bool) -> subprocess.CompletedProcess[str]:
    args = ["install", "--dry-run", "--no-deps", "--index-url", index.as_uri(), "no-such-package-po"]
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}  # this test's index only, not the machine's
    pip_bin = Path(sys.executable).parent / "pip"
    cmd = [str(ROOT / "scripts" / "quiet-pip"), str(pip_bin), *args] if quiet else [*PIP, "--quiet", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)


def test_the_index_notes_go_and_the_errors_stay(tmp_path: Path) -> None:
    index = tmp_path / "simple"
    index.mkdir()
    loud = pip_in(index, quiet=False)
    assert "is ignored: it is neither a file nor a directory." in loud.stderr  # what the script is for
    quiet = pip_in(index, quiet=True)
    assert quiet.returncode == loud.returncode == 1  # pip's status, through the filter
    assert "is ignored" not in quiet.stderr and quiet.stdout == ""
    assert "ERROR: No matching distribution found for no-such-package-po" in quiet.stderr


def test_setup_runs_every_pip_through_it() -> None:
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    pips = [line for line in setup.splitlines() if "bin/pip" in line and not line.lstrip().startswith("#")]
    assert pips and all(line.strip().startswith('scripts/quiet-pip "$VENV/bin/pip"') for line in pips)
