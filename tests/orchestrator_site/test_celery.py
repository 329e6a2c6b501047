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


def test_realtime_tasks_have_no_celery_time_limits_and_are_acked_when_they_start() -> None:
    # Celery's time limits do nothing on the thread pool: the run's own deadline holds
    # (services.execute), and a run that dies is noticed by its lease, not by the broker.
    assert run_realtime.soft_time_limit is None and run_realtime.time_limit is None
    assert run_realtime.acks_late is False


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


def test_a_realtime_message_carries_ids_never_the_prompt() -> None:
    """Published for real, through Celery's own publish, to a Redis broker (its own key
    prefix), then read back raw: the request itself stays in Redis's record."""
    import base64
    import json
    import uuid

    import redis
    from kombu import Connection

    request_id = uuid.uuid4().hex
    prefix = f"argsrepr-{uuid.uuid4().hex[:8]}:"
    with Connection("redis://127.0.0.1:6379/12", transport_options={"global_keyprefix": prefix}) as conn:
        run_realtime.apply_async(args=(request_id, 1), task_id=request_id, connection=conn)
    client = redis.Redis.from_url("redis://127.0.0.1:6379/12")
    try:
        raw = client.lpop(f"{prefix}realtime")
        assert isinstance(raw, bytes)
        message = json.loads(raw)
        assert message["headers"]["id"] == request_id and message["headers"]["task"] == "pipeline.tasks.run_realtime"
        assert message["headers"]["argsrepr"] == repr((request_id, 1))
        args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        assert args == [request_id, 1] and kwargs == {}
    finally:
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)


def test_realtime_tasks_send_task_events_unless_told_not_to() -> None:
    import os
    import subprocess
    import sys

    assert run_realtime.send_events is True and app.conf.worker_send_task_events is True
    code = "import django; django.setup(); from pipeline.tasks import run_realtime; print(run_realtime.send_events)"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "orchestrator_site.settings", "REALTIME_TASK_EVENTS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "False"


def test_every_worker_of_the_app_sweeps_leases_when_it_consumes_realtime() -> None:
    from orchestrator_site.celery import LeaseSweep

    assert LeaseSweep in app.steps["worker"]


class Timer:
    def __init__(self) -> None:
        self.calls: list[tuple[float, object]] = []

    def call_repeatedly(self, interval: float, fun: object, priority: int = 0) -> object:
        self.calls.append((interval, fun))
        return self

    def cancel(self) -> None:
        self.calls.clear()


class Worker:
    def __init__(self, queues: list[str]) -> None:
        from types import SimpleNamespace

        self.app = SimpleNamespace(amqp=SimpleNamespace(queues=SimpleNamespace(consume_from={q: None for q in queues})))
        self.timer = Timer()


@pytest.mark.parametrize(("queues", "sweeps"), [(["realtime"], True), (["realtime", "batch.high"], True), (["batch.high", "batch.low"], False)])
def test_the_sweep_runs_each_second_on_a_realtime_workers_timer(queues: list[str], sweeps: bool) -> None:
    from orchestrator_site.celery import LeaseSweep
    from pipeline.services import leases

    worker = Worker(queues)
    step = LeaseSweep(worker)
    step.start(worker)
    assert worker.timer.calls == ([(leases.SWEEP_INTERVAL_S, leases.sweep_safely)] if sweeps else [])
    step.stop(worker)
    assert worker.timer.calls == []


@pytest.mark.parametrize(
    ("name", "args", "run"),
    [
        ("pipeline.tasks.run_realtime", ["r", 2], ("r", 2)),
        ("pipeline.tasks.run_realtime", ["r"], None),
        ("pipeline.tasks.run_realtime", [1, 2], None),
        ("batches.tasks.run_batch_chunk", ["j", 0, 1], None),
    ],
)
def test_only_realtime_messages_are_held_by_their_lease(name: str, args: list[object], run: tuple[str, int] | None) -> None:
    from types import SimpleNamespace

    from orchestrator_site.celery import _run_of

    assert _run_of(SimpleNamespace(name=name, args=args)) == run
