"""``scripts/bench_http_metrics.py`` runs the three middleware setups side by side and
prints one row each, with the cost over none."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_it_measures_the_three_setups() -> None:
    run = subprocess.run(
        [sys.executable, "scripts/bench_http_metrics.py", "--requests", "30"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines()[2:]]
    assert [row[0].strip() for row in rows] == ["none", "django-prometheus", "http_metrics (ours)"]
    assert rows[0][3].strip() == "+0" and all(float(cell) > 0 for row in rows for cell in row[1:3])
