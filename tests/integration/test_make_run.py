"""`make run` brings the whole platform up on loopback, serves the README's curl, and
Ctrl-C leaves nothing running."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def pids_of(marker: str) -> set[int]:
    """The processes whose command line contains ``marker``."""
    lines = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout.splitlines()
    return {int(pid) for pid, args in (line.strip().split(None, 1) for line in lines if line.strip()) if marker in args and "ps -ww" not in args}


def test_make_run_serves_and_stops_cleanly(tmp_path: Path) -> None:
    gateway, flower, llama = free_port(), free_port(), free_port()
    # As on a fresh machine: none of the suite's own settings of the config (its file, not following versions).
    suite_only = (
        "PIPELINE_CONFIG",
        "PIPELINE_CONFIG_FOLLOW",
        "PIPELINE_CONFIG_SCOPE",
        "DJANGO_SETTINGS_MODULE",
        "PROMETHEUS_MULTIPROC_DIR",
        "FLOWER_BASIC_AUTH",
    )
    env = {k: v for k, v in os.environ.items() if k not in suite_only}
    env.update(
        GATEWAY_PORT=str(gateway),
        FLOWER_PORT=str(flower),
        LLAMA_PORT=str(llama),
        RUN_DIR=str(tmp_path),
        DATABASE_URL="postgres://postgres@127.0.0.1:5432/orchestrator_runtest",
        REDIS_URL="redis://127.0.0.1:6379/12",
        CELERY_BROKER_URL="redis://127.0.0.1:6379/11",
        REDIS_KEY_PREFIX="runtest",
    )
    out_path = tmp_path / "make-run.out"
    with out_path.open("wb") as out:
        proc = subprocess.Popen(["make", "run"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "demo tenant API key" not in out_path.read_text() or not re.search(r"po_\w+_\S+", out_path.read_text().split("API key", 1)[1]):
            assert proc.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.3)
        text = out_path.read_text()
        key = re.search(r"po_\w+_\S+", text.split("API key", 1)[1]).group(0)  # type: ignore[union-attr]
        assert f"http://127.0.0.1:{gateway}" in text and f"http://127.0.0.1:{flower}" in text

        base = f"http://127.0.0.1:{gateway}"
        assert httpx.get(f"{base}/health", timeout=10).json()["status"] == "ok"
        resp = httpx.post(
            f"{base}/api/v1/infer", json={"prompt": f"Hello from the README ({tmp_path.name})"}, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        assert resp.status_code == 200, resp.text
        assert list(resp.json()["timings_us"]) == ["rag", "assemble", "inference", "post", "stream"]
        # The gateway's /metrics shows what the realtime worker (another process) recorded:
        # after the answer, which the client may already have (BENCHMARKS.md: metrics are
        # recorded once the answer is out).
        deadline = time.monotonic() + 10
        while not re.search(
            r'^orchestrator_pipeline_requests_total\{outcome="ok",worker="echo"\} [1-9]', metrics := httpx.get(f"{base}/metrics", timeout=10).text, re.MULTILINE
        ):
            assert time.monotonic() < deadline, metrics[-3000:]
            time.sleep(0.1)
        assert (tmp_path / "metrics").is_dir()

        # A batch job through the batch worker (prefork), its answers streamed back by the gateway.
        auth = {"Authorization": f"Bearer {key}"}
        job = httpx.post(f"{base}/api/v1/batch", json={"prompts": ["first", {"prompt": "second", "custom_id": "b"}]}, headers=auth, timeout=30).json()
        deadline = time.monotonic() + 60
        while (status := httpx.get(f"{base}/api/v1/batch/{job['id']}", headers=auth, timeout=10).json())["status"] != "completed":
            assert time.monotonic() < deadline, status
            time.sleep(0.3)
        assert status["counts"] == {"total": 2, "done": 2, "failed": 0, "expired": 0, "pending": 0, "cancelled": 0}
        with httpx.stream("GET", f"{base}/api/v1/batch/{job['id']}/results", headers=auth, timeout=10) as results:
            assert results.headers["content-type"] == "application/x-ndjson"
            rows = [json.loads(line) for line in results.iter_lines() if line]
        assert [(r["index"], r["custom_id"], r["status"]) for r in rows] == [(0, "", "done"), (1, "b", "done")] and rows[1]["text"].startswith("second")
        processes = subprocess.run(["ps", "-ww", "-eo", "cls=,ni=,args="], capture_output=True, text=True).stdout.splitlines()
        policies = {(cls, ni) for cls, ni, args in (line.split(None, 2) for line in processes) if "celery" in args and "-n batch@%h" in args}
        # The batch worker and its pool yield the CPU to real-time work: SCHED_IDLE (ps: IDL,
        # no niceness), or nice 10 where chrt cannot set it.
        idle = subprocess.run(["chrt", "--idle", "0", "true"], check=False).returncode == 0
        assert policies == ({("IDL", "-")} if idle else {("TS", "10")}), policies
        deadline = time.monotonic() + 10
        while not re.search(
            r'^orchestrator_batch_items_total\{outcome="ok",priority="default"\} 2', httpx.get(f"{base}/metrics", timeout=10).text, re.MULTILINE
        ):
            assert time.monotonic() < deadline, "the batch worker's item metrics never showed"
            time.sleep(0.1)

        # The default make run wrote runs, though an earlier run on this database may have left
        # an edited file's version active: a file that changed is imported at start.
        words = httpx.post(f"{base}/api/v1/infer", json={"prompt": "the default config"}, headers=auth, timeout=60).json()["text"].split()
        assert len(words) == 16, words  # the echo worker's token_count in the default file
        # The config file edited while it runs: the scheduler imports it and every process runs it.
        config = tmp_path / "pipeline.toml"
        config.write_text(config.read_text().replace("token_count = 16", "token_count = 3"))
        deadline = time.monotonic() + 15
        while len(httpx.post(f"{base}/api/v1/infer", json={"prompt": "one two three four five"}, headers=auth, timeout=60).json()["text"].split()) != 3:
            assert time.monotonic() < deadline, "the edited pipeline.toml never applied"
            time.sleep(0.2)

        if "local" in text.split("workers", 1)[1].splitlines()[0]:
            local = httpx.post(
                f"{base}/api/v1/infer", json={"prompt": "Say hi.", "worker": "local", "max_tokens": 8}, headers={"Authorization": f"Bearer {key}"}, timeout=120
            )
            assert local.status_code == 200, local.text
            assert local.json()["model"] == "smollm2-135m" and 1 <= local.json()["usage"]["completion_tokens"] <= 8

        # A real-time worker killed outright is started again, and the platform keeps serving.
        statedb = str(tmp_path / "worker-realtime.state")
        (first,) = pids_of(statedb)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not pids_of(statedb) - {first}:
            assert time.monotonic() < deadline, (tmp_path / "supervisord.log").read_text()
            time.sleep(0.3)
        assert "exited: worker-realtime (terminated by SIGKILL" in (tmp_path / "supervisord.log").read_text()
        again = httpx.post(f"{base}/api/v1/infer", json={"prompt": "after a kill"}, headers=auth, timeout=60)
        assert again.status_code == 200 and again.json()["text"].startswith("after a kill"), again.text

        login = re.search(r"login: (\S+) / (\S+)", text)
        assert login is not None and (tmp_path / "flower.auth").read_text().strip() == f"{login[1]}:{login[2]}"
        assert (tmp_path / "flower.auth").stat().st_mode & 0o077 == 0  # the operator's alone
        deadline = time.monotonic() + 30
        while True:  # Flower takes a moment longer than the gateway
            try:
                if httpx.get(f"http://127.0.0.1:{flower}/", auth=(login[1], login[2]), timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "flower did not answer"
            time.sleep(0.3)
        assert httpx.get(f"http://127.0.0.1:{flower}/api/workers", timeout=5).status_code == 401  # no login, no API
        deadline = time.monotonic() + 30
        while True:  # the operator's login reaches its API, which lists the workers
            seen = httpx.get(f"http://127.0.0.1:{flower}/api/workers?refresh=1", auth=(login[1], login[2]), timeout=10)
            assert seen.status_code == 200, seen.text
            if any(name.startswith("realtime@") for name in seen.json()):
                break
            assert time.monotonic() < deadline, seen.text
            time.sleep(0.5)
        platform = pids_of(str(tmp_path)) | pids_of(f"--port {gateway}")
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
        try:
            proc.wait(timeout=60)
        finally:
            deadline = time.monotonic() + 30
            while group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            leftover = group_alive(proc.pid)
            if leftover:
                os.killpg(proc.pid, signal.SIGKILL)
    assert not leftover, "processes were left running after Ctrl-C"
    assert not (pids_of(str(tmp_path)) | pids_of(f"--port {gateway}")) & platform, "supervised processes were left running"
    assert "stopped." in out_path.read_text()
