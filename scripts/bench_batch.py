"""A batch job beside real-time traffic, on this machine.

Starts the gateway (uvicorn) and a real-time worker as ``bench_path.py`` does, then,
for each niceness of the batch worker (``celery -Q batch.high,batch.default,batch.low
-P prefork -c 2``, as ``make run`` starts it): real-time latency at concurrency 1
alone, the same while a batch job of ``--items`` echo prompts runs, and alone again
once it is done; the batch's throughput from its own ``started_at``/``finished_at``.
Prints a Markdown table. Everything runs on loopback and stops by itself.

``--baseline COMMIT`` measures that commit first, side by side in the same run: its
gateway and workers from a git worktree of it (the same virtualenv), on a bench
database dropped and migrated anew for each tree, then this tree's; and prints the
ratios. The batch job is a tenant's without documents (no search per item) and the
real-time requests a tenant's with 1,000, in both trees.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_path import ENV, ROOT, free_port, pct, realtime_worker_command, run_load, stop_all, wait_for_gateway

sys.path.insert(0, str(ROOT))
from orchestrator_site.gateway import gateway_command


def batch_worker_command(name: str, *, nice: int | str) -> list[str]:
    """The batch worker at a niceness, or ``"idle"``: Linux's SCHED_IDLE (``chrt --idle``),
    which runs it only on CPU time nothing else wants."""
    celery = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "orchestrator_site",
        "worker",
        "-Q",
        "batch.high,batch.default,batch.low",
        "-P",
        "prefork",
    ]  # concurrency: [queues] batch_concurrency, as under make run
    low = ["chrt", "--idle", "0"] if nice == "idle" else ["nice", "-n", str(nice)]
    return [*low, *celery, "-n", name, "--without-gossip", "--without-mingle"]


def run_batch(url: str, key: str, batch_key: str, *, items: int, requests: int) -> tuple[list[float], float, float]:
    """Real-time latencies while the job runs, the job's items per second, and the
    share of the job done when those requests finished."""
    auth = {"Authorization": f"Bearer {batch_key}"}
    prompts = [f"batch prompt {i} about a refund" for i in range(items)]
    job = httpx.post(f"{url}/api/v1/batch", json={"prompts": prompts}, headers=auth, timeout=120).json()
    while httpx.get(f"{url}/api/v1/batch/{job['id']}", headers=auth, timeout=10).json()["counts"]["done"] == 0:
        time.sleep(0.05)
    during, _, _ = run_load(url, key, requests=requests, concurrency=1)
    share = httpx.get(f"{url}/api/v1/batch/{job['id']}", headers=auth, timeout=10).json()["progress"]
    while (status := httpx.get(f"{url}/api/v1/batch/{job['id']}", headers=auth, timeout=10).json())["status"] != "completed":
        time.sleep(0.5)
    took = dt.datetime.fromisoformat(status["finished_at"]) - dt.datetime.fromisoformat(status["started_at"])
    return during, items / took.total_seconds(), share


SEED_DOCUMENTS = (
    "import django; django.setup()\n"
    "from pipeline.models import Document, Tenant\n"
    "t = Tenant.objects.get(name='bench')\n"
    "words = 'refund shipping warranty invoice account password delivery return exchange policy'.split()\n"
    "Document.objects.bulk_create([Document(tenant=t, title=f'{words[i % 10]} guide {i}', body=' '.join(words[(i + j) % 10] for j in range(120))) for i in range(1000)])\n"
    "try:\n"
    "    from pipeline.services.documents import tenant_documents_changed\n"
    "    tenant_documents_changed(tenant_id=str(t.id))  # bulk_create sends no signal\n"
    "except ImportError:\n"
    "    pass  # an older tree, which looks for documents at each request\n"
)


def prepare(tree: Path) -> tuple[str, str]:
    """The bench database anew, migrated by ``tree``; the keys of the real-time tenant
    (1,000 documents) and of the batch tenant (none)."""
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS orchestrator_bench WITH (FORCE)")
    for db in (8, 9):  # bench_path's Redis databases: no breaker, dedup or queue of the other tree
        redis.Redis(host="127.0.0.1", port=6379, db=db).flushdb()

    def run(*args: str) -> str:
        return subprocess.run([sys.executable, *args], cwd=tree, env=ENV, capture_output=True, text=True, check=True).stdout

    run("scripts/ensure_database.py")
    run("manage.py", "migrate", "--no-input", "-v", "0")
    key = run("manage.py", "create_tenant", "bench", "--reuse", "--key-name", "bench").strip()
    run("-c", SEED_DOCUMENTS)
    return key, run("manage.py", "create_tenant", "bench-batch", "--reuse", "--key-name", "bench-batch").strip()


def worktree(commit: str) -> Path:
    """A checkout of ``commit`` beside this one (made once, kept for the next run)."""
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    path = Path(f"/tmp/bench-baseline-{sha}")
    if not (path / "manage.py").exists():
        subprocess.run(["git", "worktree", "add", "--force", "--detach", str(path), sha], cwd=ROOT, capture_output=True, check=True)
    return path


def measure(tree: Path, label: str, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """One tree's rows of the table; per niceness, the P99 ratio and the items/s."""
    key, batch_key = prepare(tree)
    port = free_port()

    def start(cmd: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(cmd, cwd=tree, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    procs = [
        start(gateway_command("127.0.0.1", port, executable=(sys.executable, "-m", "uvicorn"))),
        start(realtime_worker_command(f"bench-rt-{port}@%h", threads=16)),
    ]
    url = f"http://127.0.0.1:{port}"
    found: dict[str, tuple[float, float]] = {}
    try:
        wait_for_gateway(url)
        run_load(url, key, requests=64, concurrency=4)  # warm up
        for nice in args.nice:
            worker = start(batch_worker_command(f"bench-batch-{port}-{nice}@%h", nice=nice))
            try:
                time.sleep(3)  # the worker's start-up, not measured
                alone, _, _ = run_load(url, key, requests=args.requests, concurrency=1)
                during, rate, share = run_batch(url, key, batch_key, items=args.items, requests=args.requests)
                again, _, _ = run_load(url, key, requests=args.requests, concurrency=1)
            finally:
                worker.terminate()
                worker.wait(timeout=30)
            found[nice] = (pct(during, 0.99) / pct(alone, 0.99), rate)
            sys.stdout.write(
                f"| {label} | prefork, {'SCHED_IDLE' if nice == 'idle' else f'nice {nice}'} | {pct(alone, 0.5):.1f} / {pct(alone, 0.99):.1f} | {pct(during, 0.5):.1f} / {pct(during, 0.99):.1f} | "
                f"{found[nice][0]:.2f}x | {pct(again, 0.5):.1f} / {pct(again, 0.99):.1f} | {share:.0%} | {rate:.0f} |\n"
            )
            sys.stdout.flush()
    finally:
        stop_all(procs)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200, help="real-time requests per measurement")
    parser.add_argument("--nice", nargs="+", default=["10", "idle"], help="niceness of the batch worker (or idle: chrt --idle), one run each")
    parser.add_argument("--baseline", default="", help="a commit to measure first, side by side (e.g. 75eb38a)")
    args = parser.parse_args(argv)
    sys.stdout.write(
        f"| tree | batch worker | real-time alone P50 / P99 ms | during a {args.items:,}-item batch P50 / P99 ms | P99 during / alone | "
        "alone again P50 / P99 ms | batch done when the real-time requests finished | batch items/s |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    base = measure(worktree(args.baseline), args.baseline, args) if args.baseline else {}
    head = measure(ROOT, "this tree", args)
    for nice, (ratio, rate) in head.items():
        if nice in base:
            sys.stdout.write(
                f"\nnice {nice}: items/s {rate / base[nice][1]:.2f}x the baseline's; P99 during / alone {ratio:.2f}x (baseline {base[nice][0]:.2f}x)\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
