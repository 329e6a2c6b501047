"""Redis stopped in the middle of traffic, then started again.

The platform runs as real processes (a gateway and a real-time Celery worker) on
a redis-server of the test's own, on a spare port — Redis is their token bus,
shared state and broker at once, as in the default deployment. The machine's
shared Redis is never touched. Requests keep flowing throughout: none sent while
Redis is down may fail (the gateway runs them itself), a request in flight when
it stopped may end in a 503 (its worker may still hold it: it is never run
twice), and once Redis is back the shared state is used again (requests go
through the worker and the token bus, limits are counted in Redis)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from pipeline.models import Tenant
from tests.conftest import TenantFixture, free_port, start_celery_worker, start_gateway, stop_process

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


class OwnRedis:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: redis.Redis | None = None

    def start(self) -> None:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)
            self.proc = None

    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis(port=self.port, socket_timeout=1, decode_responses=True)
        return self._client


@dataclass
class Traffic:
    url: str
    key: str
    results: list[tuple[float, int, dict]] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)  # when each result's request was sent
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, n: int) -> None:
        with httpx.Client(timeout=30) as http:
            i = 0
            while not self.stop.is_set():
                i += 1
                sent = time.monotonic()
                resp = http.post(f"{self.url}/api/v1/infer", json={"prompt": f"steady {n}-{i}"}, headers={"Authorization": f"Bearer {self.key}"})
                with self.lock:
                    self.results.append((time.monotonic(), resp.status_code, resp.json()))
                    self.sent_at.append(sent)
                time.sleep(0.02)

    def since(self, t: float) -> list[tuple[float, int, dict]]:
        with self.lock:
            return [r for r in self.results if r[0] >= t]


@pytest.fixture
def platform(tmp_path: Path, django_db_blocker: object) -> Iterator[tuple[OwnRedis, str, Path]]:
    own = OwnRedis(tmp_path)
    own.start()
    env = {
        "REDIS_URL": f"redis://127.0.0.1:{own.port}/0",
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{own.port}/1",
        "REDIS_KEY_PREFIX": "outage",
        "REDIS_SOCKET_TIMEOUT_MS": "500",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
    }
    worker = start_celery_worker("realtime", f"outage-{own.port}@localhost", tmp_path / "worker.log", {**env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    (tmp_path / "gm").mkdir()
    gateway, url = start_gateway(tmp_path / "gateway.log", {**env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "gm")})
    yield own, url, tmp_path
    stop_process(gateway)
    stop_process(worker)
    own.stop()


def degraded_gauge(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith('orchestrator_degraded{component="redis"}'):
            return float(line.split()[-1])
    raise AssertionError("no orchestrator_degraded gauge")


def executed_by_worker(own: OwnRedis, request_id: str) -> bool:
    return bool(own.client().hget(f"outage:req:{request_id}", "executed_by"))


def test_no_request_fails_while_redis_is_down_and_shared_state_returns(platform: tuple[OwnRedis, str, Path], owner: TenantFixture) -> None:
    own, url, logs = platform
    Tenant.objects.filter(pk=owner.tenant.pk).update(requests_per_minute=100_000)  # counted, never reached
    traffic = Traffic(url, owner.key)
    threads = [threading.Thread(target=traffic.run, args=(n,), daemon=True) for n in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        before = traffic.since(0)
        assert before and all(executed_by_worker(own, body["request_id"]) for _, status, body in before[-3:] if status == 200)

        own.stop()  # mid-traffic
        down_at = time.monotonic()
        time.sleep(1.0)
        assert degraded_gauge(url) == 1
        time.sleep(2.0)
        during = traffic.since(down_at)

        own.start()  # empty: --save "" keeps nothing
        up_at = time.monotonic()
        deadline = up_at + 30
        while True:  # back on the worker and the token bus
            recent = [body for _, status, body in traffic.since(up_at) if status == 200]
            if any(executed_by_worker(own, body["request_id"]) for body in recent[-5:]):
                break
            assert time.monotonic() < deadline, f"requests never went back through the worker: {own.client().info('clients')} {own.client().info('stats')}"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        traffic.stop.set()
        for t in threads:
            t.join(timeout=30)

    # Only a request in flight when Redis stopped may fail (a worker may hold it: it is
    # never run a second time), and with a 503 the client can retry; none sent after.
    failed = [(sent, status, body) for sent, (_, status, body) in zip(traffic.sent_at, traffic.results, strict=True) if status != 200]
    assert all(sent < down_at and status == 503 and body["error"]["code"] == "service_unavailable" for sent, status, body in failed), failed[:5]
    assert len(failed) <= len(threads), failed
    assert len(during) >= 5, "too little traffic while Redis was down to show anything"
    assert all(body["text"].startswith("steady") for _, _, body in during)
    # Shared state again: the gauge is down, the limiter counts in the new Redis.
    assert degraded_gauge(url) == 0
    assert own.client().zcard(f"outage:rate:req:{owner.tenant.id}") > 0
    events = [json.loads(line).get("event") for line in (logs / "gateway.log").read_text().splitlines() if line.startswith("{")]
    assert "shared_state_degraded" in events and "shared_state_restored" in events and "request_run_inline" in events
