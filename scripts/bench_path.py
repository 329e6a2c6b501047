"""The real-time path end to end, and its I/O-bound stages, on this machine.

Sets up its own database (``orchestrator_bench``) and Redis databases (8, 9),
starts the gateway (uvicorn) and a real-time Celery worker on loopback, sends requests with
httpx and reports P50/P99 of the client-side latency and of each stage's
server-side time (``timings_us``). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from orchestrator_site.gateway import gateway_command

ROOT = Path(__file__).resolve().parent.parent
ENV = {
    **os.environ,
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/orchestrator_bench",
    "REDIS_URL": "redis://127.0.0.1:6379/8",
    "CELERY_BROKER_URL": os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/9"),  # bench_ttft's --broker
    "REDIS_KEY_PREFIX": "bench",
    "LOG_LEVEL": "WARNING",
    "DJANGO_DEBUG": "0",
    "DJANGO_SETTINGS_MODULE": "orchestrator_site.settings",
}
STAGES = ("rag", "assemble", "inference", "post", "stream")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def manage(*args: str) -> str:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, check=True).stdout


def setup() -> str:
    subprocess.run([sys.executable, "scripts/ensure_database.py"], cwd=ROOT, env=ENV, check=True)
    manage("migrate", "--no-input", "-v", "0")
    key = manage("create_tenant", "bench", "--reuse", "--key-name", "bench").strip()
    code = (
        "import django; django.setup()\n"
        "from pipeline.models import Document, Tenant\n"
        "t = Tenant.objects.get(name='bench')\n"
        "if not Document.objects.filter(tenant=t).exists():\n"
        "    words = 'refund shipping warranty invoice account password delivery return exchange policy'.split()\n"
        "    Document.objects.bulk_create([Document(tenant=t, title=f'{words[i % 10]} guide {i}', body=' '.join(words[(i + j) % 10] for j in range(120))) for i in range(1000)])\n"
        "from pipeline.services.documents import tenant_documents_changed\n"
        "tenant_documents_changed(tenant_id=str(t.id))  # bulk_create sends no signal\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, check=True)
    return key


def realtime_worker_command(name: str, *, threads: int, pool: str = "threads") -> list[str]:
    """A real-time Celery worker as ``make run`` starts one (a thread pool; ``pool``
    "prefork" for the side-by-side measure: ``threads`` processes instead).
    ``BENCH_WORKER_ARGS`` adds options of ``celery worker`` to measure, such as
    ``--without-heartbeat`` or ``--prefetch-multiplier 1``."""
    celery = [sys.executable, "-m", "celery", "-A", "orchestrator_site", "worker", "-Q", "realtime", "-P", pool]
    extra = shlex.split(os.environ.get("BENCH_WORKER_ARGS", ""))
    return [*celery, "-c", str(threads), "-n", name, "--without-gossip", "--without-mingle", *extra]


def wait_for_gateway(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("gateway did not start")
        time.sleep(0.2)


def start(cmd: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=20)


def run_load(url: str, key: str, *, requests: int, concurrency: int) -> tuple[list[float], dict[str, list[float]], float]:
    latencies: list[float] = []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    lock = threading.Lock()
    per_thread = requests // concurrency

    def client() -> None:
        # A fresh session per run and thread: no request duplicates another (dedup is on).
        session = f"bench-{uuid.uuid4().hex}"
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
            for i in range(per_thread):
                started = time.perf_counter()
                resp = http.post(f"{url}/api/v1/infer", json={"prompt": f"how do I get a refund for order {i}?", "session_id": session})
                elapsed = time.perf_counter() - started
                resp.raise_for_status()
                timings = resp.json()["timings_us"]
                with lock:
                    latencies.append(elapsed * 1000)
                    for stage in STAGES:
                        stages[stage].append(timings[stage] / 1000)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, stages, len(latencies) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args(argv)
    key = setup()
    port = free_port()
    procs = [
        start(gateway_command("127.0.0.1", port, executable=(sys.executable, "-m", "uvicorn"))),
        start(realtime_worker_command(f"bench-{port}@%h", threads=16)),
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_gateway(url)
        run_load(url, key, requests=64, concurrency=8)  # warm up: pooled connections, imports
        out = sys.stdout
        out.write("| path (echo worker) | concurrency | requests | P50 ms | P99 ms | throughput req/s |\n| --- | --- | --- | --- | --- | --- |\n")
        stage_rows = []
        for concurrency in (1, 8):
            latencies, stages, rate = run_load(url, key, requests=args.requests, concurrency=concurrency)
            out.write(
                f"| POST /api/v1/infer, end to end | {concurrency} | {len(latencies)} | {pct(latencies, 0.5):.2f} | {pct(latencies, 0.99):.2f} | {rate:.0f} |\n"
            )
            stage_rows.append((concurrency, stages, latencies))
        out.write("\n| stage (server side, inside the worker) | concurrency | P50 ms | P99 ms |\n| --- | --- | --- | --- |\n")
        for concurrency, stages, latencies in stage_rows:
            for stage in STAGES:
                out.write(f"| {stage} | {concurrency} | {pct(stages[stage], 0.5):.3f} | {pct(stages[stage], 0.99):.3f} |\n")
            overhead = [lat - sum(stages[s][i] for s in STAGES) for i, lat in enumerate(latencies)]
            out.write(
                f"| gateway + queue + token bus (latency minus stages) | {concurrency} | {statistics.median(overhead):.3f} | {pct(overhead, 0.99):.3f} |\n"
            )
    finally:
        stop_all(procs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
