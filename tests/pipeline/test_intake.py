"""The gateway's start of a request on its event loop (``pipeline.intake``,
``services.ainfer_start``): one script against the real Redis, the task's message
pushed onto the real broker's list, and Celery's own path where this one does not apply."""

from __future__ import annotations

import asyncio
import base64
import copy
import gc
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import signals
from django.conf import settings
from kombu import Connection
from structlog.testing import capture_logs

from orchestrator_site.errors import Overloaded, RateLimited
from pipeline import services, tokenbus
from pipeline.config import DedupConfig, LimitsConfig, PipelineSettings
from pipeline.intake import BrokerQueue, Intake, Limits, TaskMessages
from pipeline.queues import Queue
from pipeline.resilience import admission, dedup, ratelimit
from pipeline.resilience.local import shared_state
from pipeline.resilience.ratelimit import TenantRates
from pipeline.tokenbus import TokenBus, get_bus
from pipeline.types import ChatMessage, PromptRequest
from tests.conftest import ROOT, OwnBroker, delete_redis_keys, free_port, own_queue

TENANT = "intake-tenant"


def a_request(prompt: str = "hello", **fields: Any) -> PromptRequest:
    request_id = uuid.uuid4().hex
    return PromptRequest(
        request_id=request_id,
        tenant_id=fields.pop("tenant_id", TENANT),
        session_id=fields.pop("session_id", request_id),
        prompt=prompt,
        worker="echo",
        model="echo-1",
        max_tokens=16,
        **fields,
    )


@pytest.fixture(autouse=True)
def clean(pipeline_config: Any) -> Iterator[None]:
    delete_redis_keys("dedup:*", "inflight*", "rate:*")
    pipeline_config(PipelineSettings(dedup=DedupConfig(enabled=True, window_s=30)))
    yield
    delete_redis_keys("dedup:*", "inflight*", "rate:*")
    shared_state.reset()


def start(request: PromptRequest, rates: TenantRates | None = None) -> services.Started:
    return asyncio.run(services.ainfer_start(request=request, rates=rates))


# --- the message -------------------------------------------------------------------------------


def celery_message(request: PromptRequest) -> dict[str, Any]:
    """What Celery's own publish puts on a Redis broker for the request."""
    url = "redis://127.0.0.1:6379/12"
    client = redis.Redis.from_url(url)
    client.delete(Queue.REALTIME.value)
    try:
        with Connection(url) as conn:
            services.realtime_enqueue(request, connection=conn)
        return dict(json.loads(client.lpop(Queue.REALTIME.value)))
    finally:
        client.delete(Queue.REALTIME.value)
        client.close()


def without_ids(message: dict[str, Any]) -> dict[str, Any]:
    message = copy.deepcopy(message)
    for part, field in TaskMessages.ID_FIELDS:
        message[part].pop(field)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


def test_a_message_is_the_one_celery_publishes_but_for_its_ids() -> None:
    request = a_request("a prompt", stop=("x",), metadata={"k": [1, 2]}, history=(ChatMessage("user", "earlier"),))
    ours = json.loads(services.intake_prepare().broker.messages.encode(request, services.realtime_argsrepr(request)))  # type: ignore[union-attr]
    celerys = celery_message(request)
    assert without_ids(ours) == without_ids(celerys)
    assert without_ids(ours)["body"][0] == [request.to_dict()]
    assert "a prompt" not in json.dumps(ours["headers"]) + json.dumps(ours["properties"])  # the prompt travels in the body only


def test_each_message_has_ids_of_its_own() -> None:
    messages = services.intake_prepare().broker.messages  # type: ignore[union-attr]
    request = a_request()
    one, two = (json.loads(messages.encode(request, "r")) for _ in range(2))
    for message in (one, two):
        assert message["headers"]["id"] == message["headers"]["root_id"] == message["properties"]["correlation_id"]
    assert one["headers"]["id"] != two["headers"]["id"] and one["properties"]["delivery_tag"] != two["properties"]["delivery_tag"]


def test_a_template_for_an_exchange_or_a_priority_is_not_for_this_path() -> None:
    template = services.intake_prepare().broker.messages.template  # type: ignore[union-attr]
    assert TaskMessages(template).queue == Queue.REALTIME.value
    routed = copy.deepcopy(template)
    routed["properties"]["delivery_info"]["exchange"] = "orchestrator"
    prioritised = copy.deepcopy(template)
    prioritised["properties"]["priority"] = 6
    assert TaskMessages(routed).queue is None and TaskMessages(prioritised).queue is None


def test_a_template_is_what_the_enqueue_published_or_an_error() -> None:
    with pytest.raises(RuntimeError, match="Celery put no message"):
        TaskMessages.from_celery(lambda request, connection: None, Queue.REALTIME.value)


# --- the broker --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "usable"),
    [
        ("redis://127.0.0.1:6379/1", True),
        ("rediss://cache.internal:6380/0", True),
        ("amqp://guest:guest@127.0.0.1:5672//", False),
        ("sentinel://127.0.0.1:26379", False),
        ("redis+socket:///run/redis.sock", False),
        ("redis://a:6379/0;redis://b:6379/0", False),
    ],
)
def test_only_a_single_redis_broker_takes_the_loops_path(url: str, usable: bool) -> None:
    messages = services.intake_prepare().broker.messages  # type: ignore[union-attr]
    queue = BrokerQueue.for_broker(url, {"global_keyprefix": "deploy1:", "socket_timeout": 3}, messages)
    assert (queue is not None) == usable
    if queue is not None:
        assert queue.key == f"deploy1:{Queue.REALTIME.value}"


def test_the_broker_list_carries_the_configured_key_prefix() -> None:
    queue = services.intake_prepare().broker
    assert queue is not None and queue.key == f"{settings.CELERY_BROKER_TRANSPORT_OPTIONS['global_keyprefix']}{Queue.REALTIME.value}"


def test_publish_needs_a_broker_queue() -> None:
    with pytest.raises(RuntimeError, match="no broker queue"):
        asyncio.run(Intake(None).publish(a_request(), "r"))
    assert not Intake(None).publishes


# --- the start ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_request_is_claimed_admitted_recorded_and_published(own_broker: OwnBroker) -> None:
    request = a_request()
    before = time.time()
    started = start(request)
    assert (started.how, started.request_id) == ("submitted", request.request_id)
    bus = get_bus()
    status = bus.get_status(request.request_id)
    assert (status["status"], status["tenant_id"], status["session_id"]) == ("queued", TENANT, request.session_id)
    assert before - 1 < float(status["created_at"]) <= time.time() and 0 < bus.client.ttl(bus.status_key(request.request_id)) <= bus.ttl_s
    inflight, _, _ = dedup.keys(bus.prefix, dedup.dedup_key(request))
    assert bus.client.get(inflight) == request.request_id
    assert services.admission().in_flight(TENANT) == 1
    assert not bus.client.exists(ratelimit.keys(bus.prefix, TENANT)[0])  # no limits: not even counted
    [message] = own_broker.messages()
    assert message["body"][0] == [request.to_dict()] and message["headers"]["argsrepr"] == f"(<request {request.request_id}>,)"


def pushes_counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The messages pushed on the broker's own connection (a second round trip)."""
    pushed: list[str] = []
    push = BrokerQueue.push

    async def counted(self: BrokerQueue, payload: str) -> None:
        pushed.append(payload)
        await push(self, payload)

    monkeypatch.setattr(BrokerQueue, "push", counted)
    return pushed


@pytest.mark.django_db
def test_on_a_database_of_the_bus_server_the_message_goes_with_the_script(own_broker: OwnBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite's broker is another database of the bus's server: the script pushes
    the message (one round trip), and its SELECT leaves the connection on the bus's
    database for what comes next on it."""
    pushed = pushes_counted(monkeypatch)
    bus = get_bus()

    async def two_then_read() -> tuple[list[services.Started], dict[Any, Any]]:
        requests = [a_request("one"), a_request("two")]
        started = [await services.ainfer_start(request=request) for request in requests]
        return started, await bus.aclient().hgetall(bus.status_key(requests[1].request_id))  # the connection the scripts ran on

    started, status = asyncio.run(two_then_read())
    assert [s.how for s in started] == ["submitted", "submitted"] and pushed == []
    assert [m["body"][0][0]["request_id"] for m in own_broker.messages()] == [s.request_id for s in started]
    assert status["status"] == "queued"
    assert asyncio.run(services.intake_prepare().broker.database_from(bus)) == settings.CELERY_BROKER_URL.rsplit("/", 1)[1]  # type: ignore[union-attr]


@pytest.mark.django_db
def test_a_broker_on_the_bus_database_itself_needs_no_select(monkeypatch: pytest.MonkeyPatch) -> None:
    queue, client = own_queue(monkeypatch, settings.REDIS_URL)
    pushed = pushes_counted(monkeypatch)
    try:
        request = a_request()
        assert start(request).how == "submitted" and pushed == []
        assert asyncio.run(queue.database_from(get_bus())) == ""
        [raw] = client.lrange(queue.key, 0, -1)
        assert json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]["request_id"] == request.request_id
    finally:
        client.delete(queue.key)
        client.close()


@pytest.mark.django_db
def test_a_broker_on_another_server_is_pushed_to_on_its_own_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """``localhost`` is another address than the bus's ``127.0.0.1``: as far as the
    gateway can tell, another server. The message goes by its own ``LPUSH``."""
    queue, client = own_queue(monkeypatch, settings.CELERY_BROKER_URL.replace("127.0.0.1", "localhost"))
    pushed = pushes_counted(monkeypatch)
    try:
        request = a_request()
        assert start(request).how == "submitted" and len(pushed) == 1
        assert asyncio.run(queue.database_from(get_bus())) is None
        assert client.llen(queue.key) == 1
    finally:
        client.delete(queue.key)
        client.close()


@pytest.mark.django_db
def test_a_broker_database_the_server_lacks_leaves_the_request_to_run_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """The script's SELECT fails (the server has 16 databases): the request is queued
    without its message, the caller's own push fails too, and the gateway runs it itself."""
    _queue, client = own_queue(monkeypatch, settings.REDIS_URL.rsplit("/", 1)[0] + "/99")
    pushed = pushes_counted(monkeypatch)
    try:
        with capture_logs() as logs:
            started = start(a_request())
        assert started.how == "inline" and len(pushed) == 1
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["broker_unavailable"]
    finally:
        client.close()


@pytest.mark.parametrize(("version", "local"), [("7.0.15", True), ("8.2.1", True), ("6.2.14", False), ("5.0.7", False), ("", False)])
def test_a_scripts_select_stays_in_the_script_from_redis_7(version: str, local: bool) -> None:
    from pipeline.intake import selects_within_scripts

    assert selects_within_scripts(version) is local


def test_a_server_that_refuses_info_gets_the_message_pushed_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ACL or a proxy that refuses INFO is no outage: the start goes on, with the
    message pushed by its own LPUSH, and Redis is not marked down."""
    import redis.asyncio as aioredis

    async def refused(self: aioredis.Redis, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise redis.ResponseError("NOPERM this user has no permissions to run the 'info' command")

    queue, client = own_queue(monkeypatch, settings.CELERY_BROKER_URL)
    monkeypatch.setattr(aioredis.Redis, "info", refused)
    pushed = pushes_counted(monkeypatch)
    try:
        assert start(a_request()).how == "submitted" and len(pushed) == 1 and client.llen(queue.key) == 1
        assert asyncio.run(queue.database_from(get_bus())) is None and shared_state.available()
    finally:
        client.delete(queue.key)
        client.close()


def test_before_redis_7_a_broker_database_is_pushed_to_on_its_own_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """There a script's SELECT would move the bus's connection to the broker's database."""
    from pipeline import intake

    queue, client = own_queue(monkeypatch, settings.CELERY_BROKER_URL)
    client.close()
    monkeypatch.setattr(intake, "selects_within_scripts", lambda version: False)
    assert asyncio.run(queue.database_from(get_bus())) is None


@pytest.mark.django_db
def test_an_identical_request_attaches_then_is_answered_from_the_window(own_broker: OwnBroker) -> None:
    first = start(a_request("same"))
    second = start(a_request("same"))
    assert (second.how, second.request_id) == ("attached", first.request_id)
    result = {"request_id": first.request_id, "session_id": first.request_id, "text": "answer", "worker": "echo", "model": "echo-1"}
    services.dedup_store(PipelineSettings(dedup=DedupConfig(enabled=True, window_s=30))).complete(dedup.dedup_key(a_request("same")), json.dumps(result))
    third = start(a_request("same"))
    assert third.how == "cached" and third.result is not None and third.result.text == "answer"
    assert len(own_broker.messages()) == 1 and services.admission().in_flight(TENANT) == 1  # only the first ran


@pytest.mark.django_db
def test_without_deduplication_identical_requests_each_run(own_broker: OwnBroker, pipeline_config: Any) -> None:
    pipeline_config(PipelineSettings(dedup=DedupConfig(enabled=False)))
    assert [start(a_request("same")).how for _ in range(2)] == ["submitted", "submitted"]
    bus = get_bus()
    assert len(own_broker.messages()) == 2 and list(bus.client.scan_iter(f"{bus.prefix}:dedup:*")) == []


@pytest.mark.django_db
def test_over_the_rate_limit_nothing_is_claimed_or_held(own_broker: OwnBroker) -> None:
    rates = TenantRates(requests_per_minute=1)
    assert start(a_request("one"), rates).how == "submitted"
    refused = a_request("two")
    with pytest.raises(RateLimited) as caught:
        start(refused, rates)
    assert caught.value.data == {"limit": 1, "kind": "requests_per_minute", "window_s": 60}
    assert 59 <= caught.value.retry_after <= 60  # type: ignore[operator]
    bus = get_bus()
    assert not bus.client.exists(dedup.keys(bus.prefix, dedup.dedup_key(refused))[0])  # the next one may try for itself
    assert bus.client.zcard(ratelimit.keys(bus.prefix, TENANT)[0]) == 1 and services.admission().in_flight(TENANT) == 1
    assert not bus.get_status(refused.request_id) and len(own_broker.messages()) == 1


@pytest.mark.django_db
def test_over_the_token_limit_the_request_is_refused(own_broker: OwnBroker) -> None:
    services.rate_limiter().record_tokens(TENANT, "earlier", 50)
    with pytest.raises(RateLimited) as caught:
        start(a_request(), TenantRates(tokens_per_minute=50))
    assert caught.value.data["kind"] == "tokens_per_minute" and own_broker.messages() == []


@pytest.mark.django_db
@pytest.mark.parametrize(("scope", "held_by"), [("tenant", TENANT), ("global", "someone-else")])
def test_a_full_queue_sheds_and_takes_back_the_count_and_the_claim(scope: str, held_by: str, own_broker: OwnBroker, pipeline_config: Any) -> None:
    pipeline_config(PipelineSettings(dedup=DedupConfig(enabled=True, window_s=30), limits=LimitsConfig(max_inflight_per_tenant=1, max_inflight_global=1)))
    assert services.admission().acquire(held_by, "held").admitted
    refused = a_request()
    with pytest.raises(Overloaded) as caught:
        start(refused, TenantRates(requests_per_minute=100))
    assert caught.value.data == {"scope": scope, "limit": 1} and caught.value.retry_after == 1.0
    bus = get_bus()
    assert bus.client.zcard(ratelimit.keys(bus.prefix, TENANT)[0]) == 0  # shed by us: not the tenant's to pay for
    assert not bus.client.exists(dedup.keys(bus.prefix, dedup.dedup_key(refused))[0])
    assert admission.keys(bus.prefix, TENANT)[1] and services.admission().in_flight(TENANT) == (1 if scope == "tenant" else 0)
    assert own_broker.messages() == []


@pytest.mark.django_db
def test_a_client_that_leaves_meanwhile_does_not_stop_the_request_half_way(own_broker: OwnBroker) -> None:
    request = a_request()

    async def leave_at_once() -> None:
        task = asyncio.ensure_future(services.ainfer_start(request=request))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):  # the start goes on without the client
            if own_broker.messages():
                return
            await asyncio.sleep(0.01)

    asyncio.run(leave_at_once())
    assert len(own_broker.messages()) == 1 and get_bus().get_status(request.request_id)["status"] == "queued"


@pytest.mark.django_db
def test_a_refusal_nobody_waits_for_any_more_is_not_logged_as_lost(own_broker: OwnBroker) -> None:
    errors: list[dict[str, Any]] = []

    async def leave_then_refused() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        await services.ainfer_start(request=a_request(), rates=TenantRates(requests_per_minute=1))  # the minute's one
        refused = asyncio.ensure_future(services.ainfer_start(request=a_request("other"), rates=TenantRates(requests_per_minute=1)))
        await asyncio.sleep(0)
        refused.cancel()
        await asyncio.sleep(0.2)  # the refused start ends meanwhile, unobserved

    asyncio.run(leave_then_refused())
    gc.collect()  # an unretrieved exception is reported when its task is collected
    assert errors == [] and len(own_broker.messages()) == 1


def test_the_script_counts_and_admits_exactly_under_concurrency(own_broker: OwnBroker, pipeline_config: Any) -> None:
    pipeline_config(PipelineSettings(dedup=DedupConfig(enabled=False), limits=LimitsConfig(max_inflight_per_tenant=500, max_inflight_global=500)))
    intake = services.intake_prepare()
    bus = get_bus()
    limits = Limits(dedup_window_s=0, requests_per_minute=7, tokens_per_minute=0, max_global=500, max_per_tenant=500, lease_s=60)

    async def many() -> list[str]:
        outcomes = await asyncio.gather(*(intake.start(bus, a_request(), dedup_key=None, limits=limits, now=time.time()) for _ in range(20)))
        return [outcome.kind for outcome in outcomes]

    kinds = asyncio.run(many())
    assert kinds.count("queued") == 7 and kinds.count("rate") == 13 and services.admission().in_flight(TENANT) == 7


# --- where this path does not apply --------------------------------------------------------------


@pytest.mark.django_db
def test_with_publish_traced_the_message_goes_through_celery(own_broker: OwnBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def traced(sender: str = "", headers: dict[str, Any] | None = None, **_: object) -> None:
        seen.append(str((headers or {}).get("argsrepr")))

    sent: list[dict[str, Any]] = []
    from pipeline.tasks import run_realtime

    monkeypatch.setattr(run_realtime, "apply_async", lambda **options: sent.append(options) or signals.before_task_publish.send(sender="x", headers=options))
    signals.before_task_publish.connect(traced, weak=False)
    try:
        assert not services.intake_prepare().publishes
        request = a_request()
        assert start(request).how == "submitted"
    finally:
        signals.before_task_publish.disconnect(traced)
    assert own_broker.messages() == [] and len(sent) == 1 and sent[0]["args"] == (request.to_dict(),)
    assert seen == [f"(<request {request.request_id}>,)"] and get_bus().get_status(request.request_id)["status"] == "queued"


@pytest.mark.django_db
def test_with_redis_down_the_start_falls_back_to_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    dead = TokenBus(url=f"redis://127.0.0.1:{free_port()}/0", prefix="gone", maxlen=10, ttl_s=10, socket_timeout_s=0.5)
    with monkeypatch.context() as patched, capture_logs() as logs:
        patched.setattr(tokenbus, "_bus", dead)
        started = start(a_request())
    assert started.how == "inline"  # this process runs it (services.infer_inline)
    assert shared_state.degraded and not shared_state.available()
    assert any(entry["event"] == "shared_state_degraded" and entry["action"] == "start the request" for entry in logs)


@pytest.mark.django_db
def test_with_the_broker_down_the_request_is_run_here(broker_down: None) -> None:
    request = a_request()
    with capture_logs() as logs:
        started = start(request)
    assert started.how == "inline" and services.admission().in_flight(TENANT) == 1  # the inline run gives it back
    assert [entry["error_type"] for entry in logs if entry["event"] == "broker_unavailable"] == ["ConnectionError"]


def test_the_gateway_builds_its_intake_at_start() -> None:
    code = "import orchestrator_site.asgi; from pipeline import services; i = services._intake_built; print(i is not None and i.publishes)"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "orchestrator_site.settings"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert out == ["True"]
