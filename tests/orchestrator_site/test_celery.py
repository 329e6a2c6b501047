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
