"""One session budget under 1,000 concurrent requests through two real gateway
processes and two real-time workers (the priced echo worker): the spend never
passes the budget, ends within 1 % of it, agrees with the ledger, and once the
budget is used up not one more request passes."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from pipeline.models import Budget, BudgetScope, UsageEntry
from pipeline.resilience.budget import BudgetStore, Period
from tests.cluster import Cluster, start_cluster
from tests.conftest import Fakes, TenantFixture, start_gateway, stop_process

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

BUDGET_USD = Decimal("2.00")
ANSWER_USD = Decimal("0.008")  # echo_priced: 8 answer tokens at 1,000 USD per million, no prompt price
SENT = 1000


@pytest.fixture
def platform(tmp_path: Path, session_fakes: Fakes) -> Iterator[tuple[Cluster, list[str]]]:
    cluster = start_cluster(tmp_path, limits={"max_inflight_per_tenant": 2 * SENT, "max_inflight_global": 4 * SENT}, workers=2)
    second, second_url = start_gateway(tmp_path / "gateway2.log", cluster.env)
    yield cluster, [cluster.gateway_url, second_url]
    stop_process(second)
    cluster.stop()


async def _send(urls: list[str], key: str, count: int, start: int) -> list[int]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:

        async def one(i: int) -> int:
            body = {"prompt": f"p{i}", "worker": "echo_priced", "max_tokens": 8, "session_id": "shared", "dedup": False}
            resp = await http.post(f"{urls[i % 2]}/api/v1/infer", json=body, headers={"Authorization": f"Bearer {key}"})
            return resp.status_code

        return await asyncio.gather(*(one(start + i) for i in range(count)))


def test_a_thousand_concurrent_requests_never_overshoot_a_session_budget(platform: tuple[Cluster, list[str]], owner: TenantFixture) -> None:
    cluster, urls = platform
    item = Budget.objects.create(tenant=owner.tenant, scope=BudgetScope.SESSION, session_id="shared", amount_usd=BUDGET_USD, period="total")
    statuses = Counter(asyncio.run(_send(urls, owner.key, SENT, 0)))
    answered = statuses[200]
    assert set(statuses) == {200, 402}, statuses  # nothing else: no 5xx, no shed
    assert answered == BUDGET_USD / ANSWER_USD  # exactly as many as it covers
    # Once used up, not one more passes, through either gateway.
    assert Counter(asyncio.run(_send(urls, owner.key, 50, SENT))) == {402: 50}
    # Redis's spend (nothing left reserved) agrees with the ledger, to the nano-dollar.
    store = BudgetStore(cluster.bus.redis.client, prefix=cluster.bus.prefix)
    spent, reserved = store.spend(item.id, Period.TOTAL, 0) or (0, 0)
    ledger = sum((e.cost_usd for e in UsageEntry.objects.filter(tenant=owner.tenant)), Decimal(0))
    assert reserved == 0
    assert Decimal(spent) / 10**9 == ledger == answered * ANSWER_USD
    assert BUDGET_USD * Decimal("0.99") <= ledger <= BUDGET_USD
    assert UsageEntry.objects.filter(tenant=owner.tenant).count() == answered
