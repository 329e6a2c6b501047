"""A request is started once, however its start's reply travels: the start script
is idempotent by request id, so the command that redis-py sends again when a reply
was lost changes nothing, and the request runs exactly once."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from django.conf import settings

from pipeline.models import SessionTurn
from pipeline.shared_redis import SharedRedis, get_redis, set_redis
from pipeline.tokenbus import get_bus, set_bus
from tests.conftest import Fakes, TenantFixture, WorkerProcess
from tests.fakes.redis_proxy import RedisProxy

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def lossy_redis() -> Iterator[RedisProxy]:
    """This process's shared Redis is reached through a proxy that can lose a reply."""
    proxy = RedisProxy()
    database = int(settings.REDIS_URL.rsplit("/", 1)[1] or 0)
    set_redis(SharedRedis(url=proxy.url(database), prefix=settings.REDIS_KEY_PREFIX, socket_timeout_s=2.0))
    set_bus(None)
    try:
        yield proxy
    finally:
        set_redis(None)
        set_bus(None)
        proxy.close()


def test_a_start_whose_reply_is_lost_runs_once(owner: TenantFixture, fakes: Fakes, realtime_worker: WorkerProcess, lossy_redis: RedisProxy) -> None:
    from pipeline.services import budgets

    budgets.publish(str(owner.tenant.id))  # Redis knows the tenant's budgets (none): no load before the start
    prompt = f"lost reply {uuid.uuid4().hex}"
    lossy_redis.drop_reply_to(json.dumps(prompt).encode())  # the start script carries the request
    resp = owner.client.post("/api/v1/infer", {"prompt": prompt, "worker": "openai"}, format="json")
    assert resp.status_code == 200, resp.json()
    body = resp.json()
    assert body["text"] == "Hello, world!"
    assert (lossy_redis.dropped, lossy_redis.seen) == (1, 2)  # Redis ran the start twice: the lost one, and redis-py's retry
    assert sum(1 for r in fakes.openai.requests if prompt in json.dumps(r)) == 1  # one upstream call
    record = get_bus().get_record(body["request_id"])
    assert record["runs"] == "1" and record["attempt"] == "1"
    assert SessionTurn.objects.filter(request_id=body["request_id"]).count() == 2


def test_the_start_again_changes_nothing(owner: TenantFixture) -> None:
    """The script run twice for one request: one rate count, one slot, the same record."""
    from asgiref.sync import async_to_sync

    from pipeline.config import get_config
    from pipeline.resilience.ratelimit import TenantRates
    from pipeline.services import budgets, start

    config = get_config()
    budgets.publish(str(owner.tenant.id))
    request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "twice"}, config=config)
    rates = TenantRates(requests_per_minute=10)
    first = async_to_sync(start._run_start_script)(request, rates, config, None, 0)
    before = get_bus().get_record(request.request_id)
    again = async_to_sync(start._run_start_script)(request, rates, config, None, 0)
    assert [str(part) for part in first] == [str(part) for part in again] == ["queued", request.request_id]
    assert get_bus().get_record(request.request_id) == before
    shared = get_redis()
    assert shared.client.zcard(f"{shared.prefix}:rate:req:{owner.tenant.id}") == 1
    assert shared.client.zscore(f"{shared.prefix}:inflight:{owner.tenant.id}", request.request_id) is not None
    shared.client.delete(f"{shared.prefix}:rate:req:{owner.tenant.id}", f"{shared.prefix}:inflight:{owner.tenant.id}", f"{shared.prefix}:inflight")


def test_a_tenants_first_start_whose_reply_is_lost_still_runs_once(
    owner: TenantFixture, fakes: Fakes, realtime_worker: WorkerProcess, lossy_redis: RedisProxy
) -> None:
    """Redis has not heard of the tenant's budgets yet: the first run of the script says
    so (its reply lost, and run again by redis-py), the gateway loads them, and the third
    run starts the request, once."""
    prompt = f"first start {uuid.uuid4().hex}"
    lossy_redis.drop_reply_to(json.dumps(prompt).encode())
    resp = owner.client.post("/api/v1/infer", {"prompt": prompt, "worker": "openai"}, format="json")
    assert resp.status_code == 200, resp.json()
    assert (lossy_redis.dropped, lossy_redis.seen) == (1, 3)
    assert sum(1 for r in fakes.openai.requests if prompt in json.dumps(r)) == 1
    assert get_bus().get_record(resp.json()["request_id"])["runs"] == "1"
