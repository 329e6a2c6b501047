"""The batch benchmark starts its batch worker as ``make run`` does (same queues,
pool and niceness), and the compose file gives batch containers the smaller CPU weight."""

from __future__ import annotations

import re
import shlex
import sys

import yaml

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import bench_batch


def run_sh_batch_worker() -> list[str]:
    """The batch worker's command in ``scripts/run.sh`` (its supervisord program: line
    continuations joined, supervisord's ``%%`` read as ``%``)."""
    text = (ROOT / "scripts" / "run.sh").read_text().replace("\\\n", " ")
    line = next(line.strip() for line in text.splitlines() if line.strip().startswith("program worker-batch "))
    words = shlex.split(line.replace("%%", "%"))[2:]
    return [w for w in words if not w.startswith("$")]


def test_the_benchmark_and_make_run_start_the_same_batch_worker() -> None:
    bench = bench_batch.batch_worker_command("batch@%h", nice="idle")
    run_sh = (ROOT / "scripts" / "run.sh").read_text()
    # make run: SCHED_IDLE where chrt offers it, else nice 10; the benchmark measures both.
    assert 'then BATCH_PRIORITY="chrt --idle 0"; else BATCH_PRIORITY="nice -n 10"; fi' in run_sh
    assert "program worker-batch $BATCH_PRIORITY " in run_sh
    assert bench[:3] == ["chrt", "--idle", "0"] and bench_batch.batch_worker_command("batch@%h", nice=10)[:3] == ["nice", "-n", "10"]
    flags = bench[bench.index("worker") :]
    made = run_sh_batch_worker()
    assert flags == made[made.index("worker") :]
    assert bench_batch.batch_worker_command("x", nice=0)[:3] == ["nice", "-n", "0"]


def test_batch_containers_weigh_less_than_real_time_ones() -> None:
    services = yaml.safe_load((ROOT / "docker" / "compose.yml").read_text())["services"]
    assert services["worker-batch"]["cpu_shares"] < services["worker-realtime"].get("cpu_shares", 1024)
    assert re.search(r'BATCH_PRIORITY="chrt --idle 0"', (ROOT / "scripts" / "run.sh").read_text())
