"""A platform of its own for the tests that kill, stop or revoke its processes: a
gateway and real-time workers as real processes, on the suite's Redis, broker and
database, but under key prefixes of their own, so that no other worker of the suite
takes their messages and no other sweep decides their leases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from celery import Celery
from django.conf import settings

from pipeline.shared_redis import SharedRedis
from pipeline.tokenbus import TokenBus
from tests.conftest import _control_app, start_celery_worker, start_gateway, stop_process


@dataclass
class Cluster:
    gateway_url: str
    gateway: subprocess.Popen[bytes]
    env: dict[str, str]
    workdir: Path
    bus: TokenBus
    control: Celery
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start_worker(self, name: str, *, extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        node = f"{name}@localhost"
        proc = start_celery_worker("realtime", node, self.workdir / f"{name}.log", self.env, concurrency=4, extra_args=extra)
        self.workers[node] = proc
        return proc

    def keep_workers(self, count: int) -> None:
        """``count`` live workers: the dead ones (a test killed them) replaced, at once."""
        for node, proc in list(self.workers.items()):
            if proc.poll() is not None:
                del self.workers[node]
        names = [f"w{n}" for n in range(count + len(self.workers) + 4) if f"w{n}@localhost" not in self.workers]
        with ThreadPoolExecutor(max_workers=count) as pool:
            list(pool.map(self.start_worker, names[: count - len(self.workers)]))

    def node_of(self, pid: int) -> str:
        return next(node for node, proc in self.workers.items() if proc.pid == pid)

    def stop(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                stop_process(proc)
        stop_process(self.gateway)

    def record(self, request_id: str) -> dict[str, str]:
        return self.bus.get_record(request_id)

    def wait_for(self, request_id: str, predicate: Any, *, timeout_s: float = 10) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while True:
            record = self.record(request_id)
            if record and predicate(record):
                return record
            if time.monotonic() > deadline:
                raise AssertionError(f"the record of {request_id} never matched: {record}")
            time.sleep(0.02)

    def pid_running(self, request_id: str) -> int:
        record = self.wait_for(request_id, lambda r: r.get("status") == "running")
        return int(record["executed_by"].rsplit(":", 1)[1])

    def signal(self, pid: int, sig: signal.Signals) -> None:
        os.kill(pid, sig)


def lease_config(base: str, **limits: float) -> str:
    """The suite's pipeline.toml with these ``[limits]`` as well."""
    extra = "".join(f"{name} = {value}\n" for name, value in limits.items())
    return base.replace("[limits]\n", "[limits]\n" + extra, 1)


def start_cluster(workdir: Path, *, limits: dict[str, float], workers: int = 2) -> Cluster:
    name = f"cl{uuid.uuid4().hex[:8]}"
    config = workdir / "pipeline.toml"
    config.write_text(lease_config(Path(os.environ["PIPELINE_CONFIG"]).read_text(), **limits))
    env = {"REDIS_KEY_PREFIX": name, "CELERY_BROKER_KEY_PREFIX": f"{name}:", "PIPELINE_CONFIG": str(config)}
    with ThreadPoolExecutor(max_workers=1) as pool:
        starting = pool.submit(start_gateway, workdir / "gateway.log", env)
        shared = SharedRedis(url=settings.REDIS_URL, prefix=name, socket_timeout_s=2.0)
        cluster = Cluster("", None, env, workdir, TokenBus(redis=shared, maxlen=1000, ttl_s=600), _control_app({**os.environ, **env}))  # type: ignore[arg-type]
        cluster.keep_workers(workers)
        cluster.gateway, cluster.gateway_url = starting.result()
    return cluster


class SseReader:
    """A streamed ``POST /api/v1/infer`` read in a thread: each event and when it came."""

    def __init__(self, cluster: Cluster, key: str, body: dict[str, Any]) -> None:
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(cluster.gateway_url, key, body), daemon=True)
        self._thread.start()

    def _read(self, url: str, key: str, body: dict[str, Any]) -> None:
        try:
            with httpx.stream("POST", f"{url}/api/v1/infer", json={**body, "stream": True}, headers={"Authorization": f"Bearer {key}"}, timeout=60) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        self.events.append((time.monotonic(), json.loads(line.removeprefix("data: "))))
        finally:
            self.done.set()

    def wait_for(self, kind: str, timeout_s: float = 10) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for arrived, event in list(self.events):
                if event["type"] == kind:
                    return arrived, event
            time.sleep(0.01)
        raise AssertionError(f"no {kind} event within {timeout_s}s: {self.events}")

    def kinds(self) -> list[str]:
        return [event["type"] for _, event in self.events]

    def finish(self, timeout_s: float = 30) -> list[dict[str, Any]]:
        assert self.done.wait(timeout_s), f"the stream did not end: {self.events}"
        return [event for _, event in self.events]
