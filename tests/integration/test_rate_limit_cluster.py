"""Two real gateway processes share one limit: a tenant allowed N requests per minute
gets exactly N through, never more and never fewer, however the load is split."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pipeline.models import Tenant
from pipeline.tokenbus import get_bus
from tests.conftest import ROOT, TenantFixture, _database_url, stop_process

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_gateway(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "orchestrator_site.asgi:application"],
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": _database_url()},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[list[str]]:
    started = [start_gateway(tmp_path / f"gw{i}.log") for i in range(2)]
    deadline = time.monotonic() + 60
    for proc, url in started:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code in (200, 503):
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.1)
    yield [url for _, url in started]
    for proc, _ in started:
        stop_process(proc)
    bus = get_bus()
    keys = bus.client.keys(f"{bus.prefix}:rate:*") + bus.client.keys(f"{bus.prefix}:inflight*")
    if keys:
        bus.client.delete(*keys)


@pytest.mark.parametrize(("limit", "sent"), [(12, 40), (25, 25), (7, 8)])
def test_two_gateways_admit_exactly_the_limit(gateways: list[str], owner: TenantFixture, limit: int, sent: int) -> None:
    Tenant.objects.filter(pk=owner.tenant.pk).update(requests_per_minute=limit)
    bus = get_bus()
    keys = bus.client.keys(f"{bus.prefix}:rate:*")
    if keys:
        bus.client.delete(*keys)
    statuses: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(sent)

    def one(i: int) -> None:
        url = gateways[i % 2]
        with httpx.Client(timeout=30) as http:
            barrier.wait()
            resp = http.post(f"{url}/api/v1/infer", json={"prompt": f"p{i}", "wait": False}, headers={"Authorization": f"Bearer {owner.key}"})
        with lock:
            statuses.append(resp.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(sent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses.count(202) == min(limit, sent)
    assert statuses.count(429) == sent - min(limit, sent)
    assert len(statuses) == sent
