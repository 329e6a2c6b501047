"""The real-time lane (``orchestrator_site.lane``) on the suite's Redis broker.

Each test has a Celery app of its own (a key prefix of its own on the broker) with
a few tasks that record where and how they ran, publishes to it with Celery's own
``send_task``, and runs a ``Lane`` in this process."""

from __future__ import annotations

import base64
import json
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from celery import Celery, signals
from celery.exceptions import Ignore
from celery.worker import state as worker_state
from django.conf import settings
from kombu import Exchange
from kombu import Queue as KombuQueue
from structlog.testing import capture_logs

from orchestrator_site.lane import Lane, Refused, lane_keys
from tests.conftest import Fakes, TenantFixture, WorkerProcess, _control_app, start_celery_worker, start_gateway, stop_process

QUEUE = "realtime"


@dataclass
class Probe:
    app: Celery
    prefix: str
    ran: queue.Queue[tuple[str, Any]]
    client: redis.Redis

    def lane(self, threads: int = 2, **kwargs: Any) -> Lane:
        options = self.app.conf.broker_transport_options
        keys = lane_keys(self.app.conf.broker_url, options, QUEUE)
        assert keys is not None
        return Lane(self.app, url=self.app.conf.broker_url, keys=keys, threads=threads, hostname=f"{self.prefix}@localhost", socket_timeout_s=2, **kwargs)

    def task(self, name: str) -> str:
        """A probe task's registered name (Celery keeps one callable per name in a process)."""
        return f"{self.prefix}{name}"

    def send(self, name: str, *args: Any, **options: Any) -> str:
        return str(self.app.send_task(self.task(name), args=args, queue=QUEUE, **options).id)

    def push_raw(self, raw: bytes | str) -> None:
        self.client.lpush(f"{self.prefix}{QUEUE}", raw)

    def next(self, timeout: float = 10) -> tuple[str, Any]:
        return self.ran.get(timeout=timeout)

    def queued(self) -> int:
        keys = lane_keys(self.app.conf.broker_url, self.app.conf.broker_transport_options, QUEUE) or ()
        return sum(int(self.client.llen(key)) for key in keys)


def make_probe(url: str) -> Probe:
    prefix = f"lane-{uuid.uuid4().hex[:8]}:"
    app = Celery(prefix, set_as_current=False)
    app.conf.update(
        broker_url=url,
        broker_transport_options={"global_keyprefix": prefix},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_queues=(KombuQueue(QUEUE, Exchange("orchestrator", type="direct"), routing_key=QUEUE),),
        task_default_queue=QUEUE,
    )
    ran: queue.Queue[tuple[str, Any]] = queue.Queue()

    @app.task(name=f"{prefix}record", bind=True)
    def record(self: Any, value: Any = None) -> None:
        ran.put(("record", {"value": value, "thread": threading.current_thread().name, "id": self.request.id, "delivery_info": self.request.delivery_info}))

    @app.task(name=f"{prefix}boom")
    def boom() -> None:
        raise ValueError("boom")

    barriers: dict[int, threading.Barrier] = {}

    @app.task(name=f"{prefix}together")
    def together(parties: int) -> None:
        barrier = barriers.setdefault(parties, threading.Barrier(parties))
        try:
            barrier.wait(timeout=10)
        except threading.BrokenBarrierError:
            ran.put(("together", False))
        else:
            ran.put(("together", True))

    @app.task(name=f"{prefix}again", bind=True, max_retries=1)
    def again(self: Any) -> None:
        raise self.retry(countdown=3600)  # back on the list with an ETA: refused there

    @app.task(name=f"{prefix}ignored")
    def ignored() -> None:
        raise Ignore()

    @app.task(name=f"{prefix}quiet", send_events=False)
    def quiet() -> None:
        ran.put(("quiet", None))

    @app.task(name=f"{prefix}slow")
    def slow(seconds: float) -> None:
        time.sleep(seconds)
        ran.put(("slow", seconds))

    return Probe(app, prefix, ran, redis.Redis.from_url(url))


@pytest.fixture
def probe() -> Iterator[Probe]:
    made = make_probe(settings.CELERY_BROKER_URL)
    yield made
    for key in made.client.scan_iter(f"{made.prefix}*"):
        made.client.delete(key)
    made.client.close()
    made.app.close()


@pytest.fixture
def running(probe: Probe) -> Iterator[Lane]:
    lane = probe.lane()
    lane.start()
    yield lane
    lane.stop()


# --- which lists ---------------------------------------------------------------------


def test_the_lists_are_kombus_in_its_order() -> None:
    assert lane_keys("redis://127.0.0.1:6379/1", {}, "realtime") == ("realtime", "realtime\x06\x163", "realtime\x06\x166", "realtime\x06\x169")
    options = {"global_keyprefix": "p:", "priority_steps": [0, 5], "sep": ":"}
    assert lane_keys("rediss://h:6380/0", options, "q") == ("p:q", "p:q:5")


@pytest.mark.parametrize(
    "url",
    ["amqp://guest:guest@127.0.0.1:5672//", "sentinel://127.0.0.1:26379", "redis://a:6379/0;redis://b:6379/0", "redis+socket:///tmp/redis.sock", "memory://"],
)
def test_no_lists_on_a_broker_that_is_not_one_redis_server(url: str) -> None:
    assert lane_keys(url, {}, "realtime") is None


def test_a_lane_needs_a_thread_and_a_list(probe: Probe) -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        probe.lane(threads=0)
    with pytest.raises(ValueError, match="one list"):
        Lane(probe.app, url=probe.app.conf.broker_url, keys=(), threads=1, hostname="h", socket_timeout_s=1)


# --- running messages -----------------------------------------------------------------


def test_a_message_celery_published_runs_in_a_lane_thread_through_celerys_tracer(probe: Probe, running: Lane) -> None:
    started: list[str] = []

    def prerun(task_id: str | None = None, **_: Any) -> None:
        started.append(str(task_id))

    signals.task_prerun.connect(prerun, weak=False)
    try:
        task_id = probe.send("record", {"n": 1})
        kind, seen = probe.next()
    finally:
        signals.task_prerun.disconnect(prerun)
    assert kind == "record" and seen["value"] == {"n": 1} and seen["id"] == task_id
    assert seen["thread"].startswith("realtime-lane-")
    assert seen["delivery_info"]["routing_key"] == QUEUE
    assert task_id in started  # the task signals fire: Django's connection handling and tracing hang on them


# --- task events ------------------------------------------------------------------------


@dataclass
class Events:
    """A real event receiver on the probe's broker, and a real dispatcher to send with."""

    dispatcher: Any
    got: list[dict[str, Any]]

    def of(self, task_id: str) -> list[str]:
        """The types of the events received for ``task_id``, in order."""
        return [e["type"] for e in self.got if e.get("uuid") == task_id]

    def received(self, task_id: str) -> dict[str, Any]:
        return self.one(task_id, "task-received")

    def one(self, task_id: str, kind: str) -> dict[str, Any]:
        return next(e for e in self.got if e.get("uuid") == task_id and e["type"] == kind)

    def settled(self, timeout: float = 10) -> None:
        """Everything sent so far has been received: a marker sent now arrives after it."""
        marker = uuid.uuid4().hex
        self.dispatcher.send("lane-ping", marker=marker)
        deadline = time.monotonic() + timeout
        while not any(e.get("marker") == marker for e in self.got):
            assert time.monotonic() < deadline, "the marker never arrived"
            time.sleep(0.02)


@pytest.fixture
def events(probe: Probe) -> Iterator[Events]:
    got: list[dict[str, Any]] = []
    receiver = probe.app.events.Receiver(probe.app.connection_for_read(), handlers={"*": got.append})
    listening = threading.Thread(target=receiver.capture, kwargs={"limit": None, "timeout": None, "wakeup": False}, daemon=True)
    listening.start()
    dispatcher = probe.app.events.Dispatcher(probe.app.connection_for_write(), hostname=f"{probe.prefix}@localhost", enabled=True)
    deadline = time.monotonic() + 10
    while not any(e["type"] == "lane-ping" for e in got):  # the receiver is subscribed
        assert time.monotonic() < deadline, "the event receiver never heard a ping"
        dispatcher.send("lane-ping")
        time.sleep(0.05)
    yield Events(dispatcher, got)
    receiver.should_stop = True
    listening.join(timeout=5)
    dispatcher.close()
    receiver.connection.close()


def run_in_order(probe: Probe, events: Any, *tasks: str) -> list[str]:
    """``tasks`` run one after the other by a one-thread lane, then a last one; returns
    their ids once everything the lane sent for them has been received: a marker sent
    after the last task ran arrives after it."""
    lane = probe.lane(threads=1, events=events)
    lane.start()
    try:
        ids = [probe.send(name) for name in tasks]
        probe.send("record", "last")
        while (seen := probe.next())[0] != "record" or seen[1]["value"] != "last":
            pass
    finally:
        lane.stop()
    return ids


def test_a_lane_sends_the_task_events_celerys_consumer_would(probe: Probe, events: Events) -> None:
    ok, boom, again, ignored, quiet = run_in_order(probe, lambda: events.dispatcher, "record", "boom", "again", "ignored", "quiet")
    events.settled()
    assert events.of(ok) == ["task-received", "task-started", "task-succeeded"]
    assert events.of(boom) == ["task-received", "task-started", "task-failed"]
    assert events.of(again) == ["task-received", "task-started", "task-retried"]
    assert events.of(ignored) == ["task-received", "task-started"]  # Ignore: nothing after, as Celery's request
    assert events.of(quiet) == []  # a task that sends no events
    received = events.received(ok)
    assert received["name"] == probe.task("record") and received["args"] == "()" and received["kwargs"] == "{}"
    assert received["retries"] == 0 and received["hostname"] == f"{probe.prefix}@localhost" and received["eta"] is None
    succeeded = events.one(ok, "task-succeeded")
    assert succeeded["result"] == "None" and succeeded["runtime"] > 0
    failed = events.one(boom, "task-failed")
    assert failed["exception"] == "ValueError('boom')" and "raise ValueError" in failed["traceback"]


def test_a_lane_sends_no_task_events_when_the_worker_sends_none(probe: Probe, events: Events) -> None:
    disabled = probe.app.events.Dispatcher(probe.app.connection_for_write(), hostname="off@localhost", enabled=False)  # a worker without -E
    try:
        ids = run_in_order(probe, lambda: disabled, "record") + run_in_order(probe, lambda: None, "record")  # None: before its consumer made one
    finally:
        disabled.close()
    events.settled()
    assert [events.of(task_id) for task_id in ids] == [[], []]


def test_events_that_cannot_be_sent_are_logged_and_the_task_runs(probe: Probe) -> None:
    from kombu import Connection

    from tests.conftest import free_port

    dead = Connection(f"redis://127.0.0.1:{free_port()}/0", transport_options={"max_retries": 0})  # refused at once, not retried
    dispatcher = probe.app.events.Dispatcher(dead, hostname="gone@localhost", enabled=True, buffer_while_offline=False)
    with capture_logs() as logs:
        [boom] = run_in_order(probe, lambda: dispatcher, "boom")
    unsent = [(e["event_type"], e["task_id"]) for e in logs if e["event"] == "realtime_lane_event_unsent"]
    assert unsent[:3] == [("task-received", boom), ("task-started", boom), ("task-failed", boom)]
    assert [kind for kind, _ in unsent[3:]] == ["task-received", "task-started", "task-succeeded"]  # the last task: it ran too


def test_every_priority_list_is_read_the_queues_own_first(probe: Probe) -> None:
    for priority in (9, 6, 3):
        probe.send("record", f"priority {priority}", priority=priority)
    probe.send("record", "default")
    assert probe.queued() == 4 and probe.client.llen(f"{probe.prefix}{QUEUE}\x06\x169") == 1
    lane = probe.lane(threads=1)
    lane.start()
    try:
        order = [probe.next()[1]["value"] for _ in range(4)]
    finally:
        lane.stop()
    assert order == ["default", "priority 3", "priority 6", "priority 9"]


def test_a_task_that_raises_leaves_its_thread_serving(probe: Probe) -> None:
    failed: list[str] = []

    def failure(task_id: str | None = None, exception: BaseException | None = None, **_: Any) -> None:
        failed.append(f"{task_id}:{exception}")

    lane = probe.lane(threads=1)
    lane.start()
    signals.task_failure.connect(failure, weak=False)
    try:
        boom = probe.send("boom")
        probe.send("record", "after")
        assert probe.next()[1]["value"] == "after"
    finally:
        signals.task_failure.disconnect(failure)
        lane.stop()
    assert failed == [f"{boom}:boom"]


def test_at_low_load_the_threads_that_ran_last_run_next(probe: Probe) -> None:
    """One message at a time through eight threads: two threads take turns (the leader
    that pops and runs, and the one it made leader), not all eight in rotation."""
    lane = probe.lane(threads=8)
    lane.start()
    try:
        threads = []
        for i in range(16):
            probe.send("record", i)
            threads.append(probe.next()[1]["thread"])
            deadline = time.monotonic() + 10
            while len(lane._followers) < 7 and time.monotonic() < deadline:  # the task's thread is idle again
                time.sleep(0.001)
    finally:
        lane.stop()
    assert len(set(threads)) == 2, threads


def test_threads_run_messages_at_once(probe: Probe) -> None:
    """Three messages, each waiting for the other two to be running: three threads at once."""
    lane = probe.lane(threads=3)
    for _ in range(3):
        probe.send("together", 3)
    lane.start()
    try:
        met = [probe.next() for _ in range(3)]
    finally:
        lane.stop()
    assert met == [("together", True)] * 3


def raw_message(probe: Probe, name: str = "record", **headers: Any) -> dict[str, Any]:
    """A message as kombu puts it on the list, with ``headers`` changed."""
    from kombu import Connection

    with Connection("memory://") as conn:
        probe.app.send_task(probe.task(name), args=["raw"], queue=QUEUE, connection=conn)
        message = conn.default_channel.basic_get(QUEUE, no_ack=True)
    payload: dict[str, Any] = message.serializable()
    payload["headers"].update(headers)
    return payload


def refusals(probe: Probe) -> list[tuple[str, Any]]:
    """What ``raw_message`` variants the lane refuses, by the event it logs."""
    pickled = raw_message(probe)
    pickled["content-type"] = "application/x-python-serialize"
    bad_base64 = raw_message(probe)
    bad_base64["body"] = "%%%"
    no_task = raw_message(probe)
    del no_task["headers"]["task"]
    not_json_body = raw_message(probe)
    not_json_body["body"] = base64.b64encode(b"{not json").decode()
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    earlier = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    return [
        ("realtime_lane_message_invalid", b"not json at all"),
        ("realtime_lane_message_invalid", b"[1, 2]"),
        ("realtime_lane_message_invalid", no_task),
        ("realtime_lane_message_invalid", bad_base64),
        ("realtime_lane_message_invalid", pickled),  # kombu refuses a content type the app does not accept
        ("realtime_lane_message_invalid", not_json_body),
        ("realtime_lane_message_invalid", raw_message(probe, eta="not a time")),
        ("realtime_lane_task_unregistered", raw_message(probe, name="nobody", task=probe.task("nobody"))),
        ("realtime_lane_task_expired", raw_message(probe, expires=earlier)),
        ("realtime_lane_task_refused", raw_message(probe, eta=later)),
    ]


def test_messages_it_cannot_run_are_logged_and_dropped_and_the_thread_goes_on(probe: Probe) -> None:
    cases = refusals(probe)
    revoked = raw_message(probe)
    worker_state.revoked.add(revoked["headers"]["id"])
    cases.append(("realtime_lane_task_revoked", revoked))
    lane = probe.lane(threads=1)
    with capture_logs() as logs:
        for _, message in cases:
            probe.push_raw(message if isinstance(message, bytes) else json.dumps(message))
        probe.send("record", "still serving")
        lane.start()
        try:
            assert probe.next()[1]["value"] == "still serving"
        finally:
            lane.stop()
            worker_state.revoked.discard(revoked["headers"]["id"])
    assert probe.ran.empty()  # none of them ran
    dropped = [entry["event"] for entry in logs if entry.get("outcome") == "dropped"]
    assert dropped == [event for event, _ in cases]
    assert all(entry["log_level"] == "error" and entry["reason"] for entry in logs if entry.get("outcome") == "dropped")


def test_an_eta_already_passed_runs(probe: Probe, running: Lane) -> None:
    probe.push_raw(json.dumps(raw_message(probe, eta=(datetime.now(UTC) - timedelta(seconds=5)).isoformat(), expires=None)))
    assert probe.next()[1]["value"] == "raw"


def test_decode_builds_the_request_celerys_consumer_builds(probe: Probe) -> None:
    message = raw_message(probe)
    name, task_id, request, body, content_type, encoding = probe.lane().decode(json.dumps(message).encode())
    assert (name, task_id, content_type, encoding) == (probe.task("record"), message["headers"]["id"], "application/json", "utf-8")
    assert json.loads(body)[0] == ["raw"]
    assert request["hostname"] == f"{probe.prefix}@localhost" and request["correlation_id"] == task_id
    assert request["delivery_info"] == {"exchange": "", "routing_key": QUEUE, "priority": 0, "redelivered": False}
    assert request["task"] == probe.task("record") and request["argsrepr"] == "['raw']"


def test_an_unexpected_failure_in_a_message_is_logged_and_the_thread_goes_on(probe: Probe, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the refusals: something the tracer itself raised (here: the task registry broken for one message)."""
    lane = probe.lane(threads=1)
    real = lane.decode
    calls = {"n": 0}

    def decode_once_broken(raw: bytes) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise LookupError("registry broken")
        return real(raw)

    monkeypatch.setattr(lane, "decode", decode_once_broken)
    with capture_logs() as logs:
        probe.send("record", "first")
        probe.send("record", "second")
        lane.start()
        try:
            assert probe.next()[1]["value"] == "second"
        finally:
            lane.stop()
    failed = [entry for entry in logs if entry["event"] == "realtime_lane_message_failed"]
    assert len(failed) == 1 and failed[0]["error_type"] == "LookupError" and failed[0]["exc_info"]


def test_refused_is_what_decode_raises(probe: Probe) -> None:
    with pytest.raises(Refused) as raised:
        probe.lane().decode(b"{}")
    assert raised.value.event == "realtime_lane_message_invalid"


# --- stopping -----------------------------------------------------------------------------


def test_a_warm_stop_lets_the_running_task_finish_and_leaves_the_rest_on_the_list(probe: Probe) -> None:
    lane = probe.lane(threads=1)
    lane.start()
    probe.send("slow", 0.5)
    deadline = time.monotonic() + 10
    while probe.queued() and time.monotonic() < deadline:  # popped: running
        time.sleep(0.01)
    probe.send("record", "after the stop")
    lane.stop()
    assert probe.next(timeout=0) == ("slow", 0.5)  # finished before stop() returned
    assert probe.queued() == 1  # the next one was not taken


def test_idle_threads_are_unblocked_at_once_not_after_their_poll(probe: Probe) -> None:
    lane = probe.lane(threads=4)
    lane.poll_s = 30
    lane.start()
    deadline = time.monotonic() + 10
    while not blocked_clients(probe) and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    lane.stop()
    assert time.monotonic() - started < 10  # CLIENT UNBLOCK, not the 30 s BRPOP running out
    assert not any(thread.is_alive() for thread in lane._threads)
    assert blocked_clients(probe) == []


def test_terminate_returns_without_waiting_for_a_running_task(probe: Probe) -> None:
    lane = probe.lane(threads=1)
    lane.start()
    probe.send("slow", 1.0)
    while probe.queued():
        time.sleep(0.01)
    lane.terminate()
    assert probe.ran.empty()  # still running: not waited for
    assert probe.next() == ("slow", 1.0)
    lane.stop()  # and then nothing more runs


def blocked_clients(probe: Probe) -> list[dict[str, Any]]:
    """The lane's connections blocked in ``BRPOP`` (its one connection, while a thread leads)."""
    return [c for c in probe.client.client_list() if c.get("name", "").startswith(f"realtime-lane:{probe.prefix}") and c.get("cmd") == "brpop"]


# --- the broker going away ---------------------------------------------------------------


def test_a_killed_connection_is_logged_reopened_and_served_again(probe: Probe, running: Lane) -> None:
    deadline = time.monotonic() + 10
    while not blocked_clients(probe) and time.monotonic() < deadline:
        time.sleep(0.02)
    with capture_logs() as logs:
        for client in blocked_clients(probe):
            probe.client.client_kill_filter(_id=client["id"])
        while not any(entry["event"] == "realtime_lane_broker_back" for entry in logs) and time.monotonic() < deadline:
            time.sleep(0.02)
        probe.send("record", "after the kill")
        assert probe.next()[1]["value"] == "after the kill"
    events = [entry["event"] for entry in logs]
    assert events.count("realtime_lane_broker_unavailable") == 1 and events.count("realtime_lane_broker_back") == 1


def test_a_broker_that_is_down_is_waited_for_and_a_stop_still_returns(probe: Probe) -> None:
    from tests.conftest import free_port

    keys = lane_keys("redis://127.0.0.1:6379/0", {}, QUEUE) or ()
    lane = Lane(probe.app, url=f"redis://127.0.0.1:{free_port()}/0", keys=keys, threads=2, hostname="down@localhost", socket_timeout_s=1)
    with capture_logs() as logs:
        lane.start()
        time.sleep(0.5)
        lane.stop()
    unavailable = [entry for entry in logs if entry["event"] == "realtime_lane_broker_unavailable"]
    assert len(unavailable) == 1 and unavailable[0]["error_type"] == "ConnectionError"  # once, not per retry
    assert not any(thread.is_alive() for thread in lane._threads)


def test_a_stop_when_the_broker_has_just_gone_is_logged_and_still_returns(probe: Probe, tmp_path: Path) -> None:
    """The threads wait on a server that then stops: ``CLIENT UNBLOCK`` cannot be sent."""
    from tests.pipeline.test_redis_outage import OwnRedis

    own = OwnRedis(tmp_path)
    own.start()
    lane = Lane(probe.app, url=f"redis://127.0.0.1:{own.port}/0", keys=(QUEUE,), threads=2, hostname="gone@localhost", socket_timeout_s=1)
    lane.poll_s = 30
    try:
        lane.start()
        deadline = time.monotonic() + 10
        while (
            not [c for c in own.client().client_list() if c.get("name") == "realtime-lane:gone@localhost" and c.get("cmd") == "brpop"]
            and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        own.proc.send_signal(signal.SIGSTOP)  # there, but answering nothing: the unblock times out
        with capture_logs() as logs:
            started = time.monotonic()
            lane.terminate()
            assert time.monotonic() - started < 10
    finally:
        own.proc.send_signal(signal.SIGCONT)
        own.stop()
    for thread in lane._threads:
        thread.join(timeout=20)  # the server gone, each BRPOP fails and its thread ends
    assert not any(thread.is_alive() for thread in lane._threads)
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"][:1] == ["realtime_lane_unblock_failed"]


# --- the worker's bootstep ---------------------------------------------------------------


def work_controller(app: Celery, queues: list[str], pool: str = "threads") -> Any:
    """A worker as ``celery worker -Q … -P … -c 3`` builds it (not started: no connection)."""
    return app.WorkController(hostname="step@localhost", queues=queues, pool_cls=pool, concurrency=3, without_gossip=True, without_mingle=True)


@pytest.fixture
def step_app(probe: Probe) -> Celery:
    from orchestrator_site.lane import LaneStep

    probe.app.steps["worker"].add(LaneStep)
    return probe.app


def lane_step(worker: Any) -> Any:
    from orchestrator_site.lane import LaneStep

    return next((step for step in worker.blueprint.steps.values() if isinstance(step, LaneStep)), None)


def test_a_realtime_thread_worker_on_redis_gets_the_lane_and_celery_consumes_no_queue(step_app: Celery) -> None:
    worker = work_controller(step_app, [QUEUE])
    step = lane_step(worker)
    assert step is not None and step.enabled and isinstance(step.obj, Lane)
    assert step.obj.keys == lane_keys(step_app.conf.broker_url, step_app.conf.broker_transport_options, QUEUE)
    assert step.obj._count == 3 and step.obj.hostname == "step@localhost"
    assert dict(step_app.amqp.queues.consume_from) == {}  # Celery's consumer: control commands only
    assert step in worker.steps  # started and stopped with the worker


@pytest.mark.parametrize(
    ("queues", "pool", "setting", "reason"),
    [
        ([QUEUE, "batch.high"], "threads", {}, "does not consume 'realtime' alone"),
        (["batch.high"], "threads", {}, "does not consume 'realtime' alone"),
        ([QUEUE], "solo", {}, "not the thread pool"),
        ([QUEUE], "prefork", {}, "not the thread pool"),
        ([QUEUE], "threads", {"REALTIME_LANE": False}, "REALTIME_LANE is off"),
    ],
)
def test_any_other_worker_keeps_celerys_consumer(step_app: Celery, settings: Any, queues: list[str], pool: str, setting: dict[str, bool], reason: str) -> None:
    for name, value in setting.items():
        setattr(settings, name, value)
    step_app.conf.task_queues = (*step_app.conf.task_queues, KombuQueue("batch.high", routing_key="batch.high"))
    with capture_logs() as logs:
        worker = work_controller(step_app, queues, pool)
    step = lane_step(worker)
    assert step is not None and not step.enabled and step.obj is None and step not in worker.steps
    assert reason in step.reason and [entry["reason"] for entry in logs if entry["event"] == "realtime_lane_off"] == [step.reason]
    assert set(step_app.amqp.queues.consume_from) == set(queues)


def test_with_real_time_task_events_on_the_lane_sends_them_through_the_workers_dispatcher(step_app: Celery, settings: Any) -> None:
    settings.REALTIME_TASK_EVENTS = True
    worker = work_controller(step_app, [QUEUE])
    step = lane_step(worker)
    assert step is not None and step.enabled and isinstance(step.obj, Lane)
    assert step.obj.events is not None and step.obj.events() is None  # the consumer makes its dispatcher when it starts
    worker.consumer.event_dispatcher = dispatcher = object()
    assert step.obj.events() is dispatcher


def test_no_lane_on_a_broker_that_is_not_redis(settings: Any) -> None:
    from orchestrator_site.lane import LaneStep

    app = Celery("amqp-lane", set_as_current=False)
    app.conf.update(broker_read_url="amqp://guest:guest@127.0.0.1:5672//", task_queues=(KombuQueue(QUEUE, routing_key=QUEUE),))
    app.steps["worker"].add(LaneStep)
    step = lane_step(work_controller(app, [QUEUE]))
    assert step is not None and not step.enabled and step.reason == "the broker is not one Redis server"
    assert set(app.amqp.queues.consume_from) == {QUEUE}


# --- real processes -------------------------------------------------------------------------


def test_the_suites_realtime_worker_serves_through_the_lane(realtime_worker: WorkerProcess) -> None:
    """So every request-path test of the suite runs its task in the lane."""
    from orchestrator_site.celery import app

    name = f"realtime-test-{os.getpid()}@localhost"
    replies = app.control.inspect([name], timeout=5).active_queues()
    assert replies == {name: []}  # answering control commands, consuming no queue through Celery
    lanes = [c for c in redis.Redis.from_url(settings.CELERY_BROKER_URL).client_list() if c.get("name") == f"realtime-lane:{name}"]
    assert len(lanes) == 1  # the threads take turns at one connection


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("lane", ["1", "0"])
def test_a_warm_shutdown_finishes_the_request_in_flight(lane: str, owner: TenantFixture, fakes: Fakes, tmp_path: Path) -> None:
    """With the lane and without it (Celery's consumer): a worker told to stop while it
    streams a request finishes it, and the client gets the whole answer."""

    tag = uuid.uuid4().hex[:8]
    env = {"REDIS_KEY_PREFIX": f"shutdown-{tag}", "CELERY_BROKER_KEY_PREFIX": f"shutdown-{tag}:", "REALTIME_LANE": lane, "LOG_LEVEL": "INFO"}
    name = f"shutdown-{tag}@localhost"
    worker = start_celery_worker("realtime", name, tmp_path / "worker.log", {**env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    (tmp_path / "gm").mkdir()
    gateway, url = start_gateway(tmp_path / "gateway.log", {**env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "gm")})
    try:
        control = _control_app({"CELERY_BROKER_URL": settings.CELERY_BROKER_URL, "CELERY_BROKER_KEY_PREFIX": env["CELERY_BROKER_KEY_PREFIX"]})
        queues = control.control.inspect([name], timeout=5).active_queues()[name]
        assert [q["name"] for q in queues] == ([] if lane == "1" else ["realtime"])
        fakes.openai.tokens, fakes.openai.token_delay_s = [f"t{i} " for i in range(20)], 0.05  # a second of streaming
        answer: dict[str, Any] = {}

        def ask() -> None:
            resp = httpx.post(f"{url}/api/v1/infer", json={"prompt": "stay", "worker": "openai"}, headers={"Authorization": f"Bearer {owner.key}"}, timeout=30)
            answer.update(status=resp.status_code, body=resp.json())

        client = threading.Thread(target=ask)
        client.start()
        bus = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
        deadline = time.monotonic() + 10
        while not any(bus.hget(key, "status") == "running" for key in bus.scan_iter(f"{env['REDIS_KEY_PREFIX']}:req:*")):
            assert time.monotonic() < deadline, "the request never ran"
            time.sleep(0.01)
        worker.terminate()  # SIGTERM: Celery's warm shutdown
        assert worker.wait(timeout=30) == 0
        client.join(timeout=30)
    finally:
        stop_process(gateway)
        stop_process(worker)
    assert answer["status"] == 200 and answer["body"]["text"] == " ".join(f"t{i}" for i in range(20)), answer
    log = (tmp_path / "worker.log").read_text()
    assert ("realtime_lane_stopped" in log) is (lane == "1") and ("realtime_lane_off" in log) is (lane == "0")
