"""The Celery app: queues from the Queue enum, JSON only, routing, limits."""

from __future__ import annotations

import pytest

from orchestrator_site.celery import app
from pipeline.queues import TASK_ROUTES, Queue
from pipeline.tasks import run_realtime


def test_all_four_queues_are_declared() -> None:
    names = {q.name for q in app.conf.task_queues}
    assert names == {"realtime", "batch.high", "batch.default", "batch.low"}
    assert {q.value for q in Queue} == names


def test_routing_keys_match_queue_names() -> None:
    for queue in app.conf.task_queues:
        assert queue.routing_key == queue.name
        assert queue.exchange.name == "orchestrator"


def test_realtime_task_is_routed_to_realtime() -> None:
    route = app.amqp.router.route({}, run_realtime.name, args=(), kwargs={})
    assert route["queue"].name == "realtime"
    assert TASK_ROUTES[run_realtime.name]["queue"] == Queue.REALTIME


def test_nothing_defaults_to_the_implicit_celery_queue() -> None:
    route = app.amqp.router.route({}, "some.unrouted.task", args=(), kwargs={})
    assert route["queue"].name == "batch.default"


def test_json_only_and_no_result_backend() -> None:
    assert app.conf.task_serializer == "json"
    assert app.conf.accept_content == ["json"]
    assert app.conf.task_ignore_result is True
    assert not app.conf.result_backend


def test_realtime_task_limits_and_delivery() -> None:
    assert run_realtime.soft_time_limit == 150 and run_realtime.time_limit == 180
    assert run_realtime.acks_late is False  # a real-time request is never replayed to a gone client


def test_batch_queues_helper() -> None:
    assert Queue.batch_queues() == (Queue.BATCH_HIGH, Queue.BATCH_DEFAULT, Queue.BATCH_LOW)
    assert Queue.REALTIME not in Queue.batch_queues()


def test_one_direct_exchange_and_durable_queues() -> None:
    exchanges = {q.exchange.name: q.exchange.type for q in app.conf.task_queues}
    assert exchanges == {"orchestrator": "direct"}
    assert all(q.durable for q in app.conf.task_queues)
    assert app.conf.task_default_exchange == "orchestrator" and app.conf.task_default_routing_key == "batch.default"


def test_broker_url_comes_from_the_settings() -> None:
    from django.conf import settings

    assert app.conf.broker_url == settings.CELERY_BROKER_URL
    assert app.conf.broker_connection_retry_on_startup is True
    assert app.conf.worker_hijack_root_logger is False  # our structlog handler stays in charge


def test_declared_queues_follow_the_enum_order() -> None:
    assert [q.name for q in app.conf.task_queues] == [q.value for q in Queue]


def test_tasks_are_discovered_from_the_apps() -> None:
    app.loader.import_default_modules()
    assert "pipeline.tasks.run_realtime" in app.tasks


class Conf:
    def __init__(self) -> None:
        self.broker_transport_options = {"visibility_timeout": 3600}


@pytest.mark.parametrize(
    ("queues", "emulated"),
    [
        ("realtime", False),  # only real-time: at most once, no ack emulation
        (["realtime"], False),
        ("realtime,batch.high", True),  # a batch queue needs its unacked messages restored
        ("batch.high,batch.default,batch.low", True),
        (None, True),  # every queue
    ],
)
def test_only_a_realtime_only_worker_drops_ack_emulation(queues: object, emulated: bool) -> None:
    from orchestrator_site.celery import _realtime_is_at_most_once

    conf = Conf()
    _realtime_is_at_most_once(conf=conf, options={"queues": queues})
    assert conf.broker_transport_options.get("ack_emulation", True) is emulated
    assert conf.broker_transport_options["visibility_timeout"] == 3600  # the rest is kept
    _realtime_is_at_most_once(conf=None, options=None)  # a signal without them: nothing to do


def test_a_realtime_message_names_its_request_not_its_prompt() -> None:
    """Published for real to a Redis broker (its own key prefix), then read back raw."""
    import base64
    import json
    import uuid

    import redis
    from kombu import Connection

    from pipeline import services
    from pipeline.types import PromptRequest

    request = PromptRequest(request_id=uuid.uuid4().hex, tenant_id="t", session_id="s", prompt="my secret prompt", worker="echo", model="echo-1", max_tokens=5)
    prefix = f"argsrepr-{uuid.uuid4().hex[:8]}:"
    with Connection("redis://127.0.0.1:6379/12", transport_options={"global_keyprefix": prefix}) as conn:
        services.realtime_enqueue(request, connection=conn)
    client = redis.Redis.from_url("redis://127.0.0.1:6379/12")
    try:
        raw = client.lpop(f"{prefix}realtime")
        assert isinstance(raw, bytes)
        message = json.loads(raw)
        assert message["headers"]["argsrepr"] == f"(<request {request.request_id}>,)" and message["headers"]["kwargsrepr"] == "{}"
        assert "secret" not in json.dumps(message["headers"])
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        assert args[0]["prompt"] == "my secret prompt"  # the worker still gets it
    finally:
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)


def test_realtime_tasks_send_task_events_only_when_asked() -> None:
    import os
    import subprocess
    import sys

    assert run_realtime.send_events is False and app.tasks["batches.tasks.run_batch_chunk"].send_events is True
    code = "import django; django.setup(); from pipeline.tasks import run_realtime; print(run_realtime.send_events)"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "orchestrator_site.settings", "REALTIME_TASK_EVENTS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "True"


def test_every_worker_of_the_app_is_offered_the_realtime_lane() -> None:
    from orchestrator_site.lane import LaneStep

    assert LaneStep in app.steps["worker"]
