"""A batch job beside real-time traffic, on this machine.

Starts the gateway (uvicorn) and a real-time worker as ``bench_path.py`` does, then,
for each niceness of the batch worker (``celery -Q batch.high,batch.default,batch.low
-P prefork -c 2``, as ``make run`` starts it): real-time latency at concurrency 1
alone, the same while a batch job of ``--items`` echo prompts runs, and alone again
once it is done; the batch's throughput from its own ``started_at``/``finished_at``.
Prints a Markdown table. Everything runs on loopback and stops by itself.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_path import ROOT, free_port, pct, realtime_worker_command, run_load, setup, start, stop_all, wait_for_gateway

sys.path.insert(0, str(ROOT))
from orchestrator_site.gateway import gateway_command


def batch_worker_command(name: str, *, nice: int) -> list[str]:
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
    return ["nice", "-n", str(nice), *celery, "-n", name, "--without-gossip", "--without-mingle"]


def run_batch(url: str, key: str, *, items: int, requests: int) -> tuple[list[float], float, float]:
    """Real-time latencies while the job runs, the job's items per second, and the
    share of the job done when those requests finished."""
    auth = {"Authorization": f"Bearer {key}"}
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200, help="real-time requests per measurement")
    parser.add_argument("--nice", type=int, nargs="+", default=[0, 10], help="niceness of the batch worker, one run each")
    args = parser.parse_args(argv)
    key = setup()
    port = free_port()
    procs = [
        start(gateway_command("127.0.0.1", port, executable=(sys.executable, "-m", "uvicorn"))),
        start(realtime_worker_command(f"bench-rt-{port}@%h", threads=16)),
    ]
    url = f"http://127.0.0.1:{port}"
    out = sys.stdout
    try:
        wait_for_gateway(url)
        run_load(url, key, requests=64, concurrency=4)  # warm up
        out.write(
            f"| batch worker | real-time alone P50 / P99 ms | during a {args.items:,}-item batch P50 / P99 ms | P99 during / alone | "
            "alone again P50 / P99 ms | batch done when the real-time requests finished | batch items/s |\n"
            "| --- | --- | --- | --- | --- | --- | --- |\n"
        )
        for nice in args.nice:
            worker = start(batch_worker_command(f"bench-batch-{port}-{nice}@%h", nice=nice))
            try:
                time.sleep(3)  # the worker's start-up, not measured
                alone, _, _ = run_load(url, key, requests=args.requests, concurrency=1)
                during, rate, share = run_batch(url, key, items=args.items, requests=args.requests)
                again, _, _ = run_load(url, key, requests=args.requests, concurrency=1)
            finally:
                worker.terminate()
                worker.wait(timeout=30)
            out.write(
                f"| prefork -c 2, nice {nice} | {pct(alone, 0.5):.1f} / {pct(alone, 0.99):.1f} | {pct(during, 0.5):.1f} / {pct(during, 0.99):.1f} | "
                f"{pct(during, 0.99) / pct(alone, 0.99):.2f}x | {pct(again, 0.5):.1f} / {pct(again, 0.99):.1f} | {share:.0%} | {rate:.0f} |\n"
            )
            out.flush()
    finally:
        stop_all(procs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
