"""Two real gateway processes share one limit: a tenant allowed N requests per minute
gets exactly N through, never more and never fewer, however the load is split."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pipeline.models import Tenant
from pipeline.tokenbus import get_bus
from tests.conftest import TenantFixture, start_gateway, stop_process

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[list[str]]:
    started = [start_gateway(tmp_path / f"gw{i}.log") for i in range(2)]
    yield [url for _, url in started]
    for proc, _ in started:
        stop_process(proc)
    bus = get_bus()
    keys = bus.redis.client.keys(f"{bus.prefix}:rate:*") + bus.redis.client.keys(f"{bus.prefix}:inflight*")
    if keys:
        bus.redis.client.delete(*keys)


@pytest.mark.parametrize(("limit", "sent"), [(12, 40), (25, 25), (7, 8)])
def test_two_gateways_admit_exactly_the_limit(gateways: list[str], owner: TenantFixture, limit: int, sent: int) -> None:
    Tenant.objects.filter(pk=owner.tenant.pk).update(requests_per_minute=limit)
    bus = get_bus()
    keys = bus.redis.client.keys(f"{bus.prefix}:rate:*")
    if keys:
        bus.redis.client.delete(*keys)
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
