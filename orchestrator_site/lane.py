"""The real-time lane: a real-time worker's own consumer of the ``realtime`` list.

Celery's consumer hands every message from its main thread to a pool thread: the
message crosses two wake-ups (the consumer's, then the pool thread's) before the
task starts. In the lane the worker's threads take turns at ``BRPOP`` of the list
(``Lane``), and the thread that popped a message runs it through Celery's own
tracer (``trace_task_ret``, what the thread pool runs): the same task signals
(Django's connection handling, OpenTelemetry's spans), the same logging, the
same exception handling, one hand-off fewer.

It is used by a worker that consumes only ``realtime`` from one Redis broker with
the thread pool, when ``REALTIME_LANE`` is on (the default); the worker's Celery
consumer then consumes no task queue of its own and keeps serving control commands
(ping, stats, shutdown) and heartbeats. Any other worker runs real-time tasks
through Celery's consumer, unchanged. When the worker sends task events (``-E``)
and the task does (``REALTIME_TASK_EVENTS``), the lane sends what Celery's
consumer and request would: ``task-received``, ``task-started``, then
``task-succeeded``, ``task-failed`` or ``task-retried``, through the worker's own
event dispatcher (its publishing is locked: Celery's thread pool sends from its
threads too).

Delivery is at most once, as ``run_realtime`` is with Celery on this worker
(``acks_late=False``, no ack emulation: ``orchestrator_site.celery``): a message
is off the list once popped. The lists are kombu's, in kombu's order: the queue's
own list first, then its priority lists. A message the lane cannot run as it is,
is logged and dropped, as Celery's consumer drops it: not JSON or not a task
message (``realtime_lane_message_invalid``), a task this worker does not know
(``..._unregistered``), a revoked or expired task (``..._revoked``,
``..._expired``). A message with an ETA in the future is refused
(``..._refused``): real-time tasks are never scheduled.

On a warm shutdown every thread finishes the task it runs; the waiting ``BRPOP`` is
ended by ``CLIENT UNBLOCK`` (no message is lost to it: it returns empty).
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import redis
import structlog
from billiard.einfo import ExceptionWithTraceback  # type: ignore[attr-defined]  # the stubs lack it; Celery's request imports it from here
from celery import Celery, bootsteps
from celery.app.trace import trace_task_ret
from celery.concurrency.thread import TaskPool as ThreadPool
from celery.exceptions import Ignore, Retry
from celery.utils.saferepr import saferepr
from celery.utils.serialization import get_pickled_exception
from celery.utils.time import maybe_iso8601
from celery.worker import state as worker_state
from kombu.exceptions import KombuError
from kombu.transport.redis import PRIORITY_STEPS, Channel

from pipeline.intake import one_redis_server

log = structlog.get_logger("orchestrator_site.lane")

POLL_S = 5  # how long one BRPOP blocks: a dead server is noticed within this and the socket timeout
BACKOFF_S = (0.05, 1.0)  # first and longest wait before reconnecting to a broker that is down


def lane_keys(url: str, options: Mapping[str, Any], queue: str) -> tuple[str, ...] | None:
    """The Redis lists kombu keeps ``queue`` in on this broker (Celery's ``broker_url``
    and ``broker_transport_options``), in the order its consumer pops them; None unless
    the broker is one Redis server (not a failover list, Sentinel or a socket path)."""
    if not one_redis_server(url):
        return None
    prefix, sep = str(options.get("global_keyprefix", "")), str(options.get("sep", Channel.sep))
    steps: Iterable[int] = options.get("priority_steps", PRIORITY_STEPS)
    return tuple(f"{prefix}{queue}{sep}{step}" if step else f"{prefix}{queue}" for step in steps)


def _send(events: Any, kind: str, **fields: Any) -> None:
    """One task event; one that cannot be sent is logged, and the task runs all the same
    (its message is off the list: an event never costs a task)."""
    try:
        events.send(kind, **fields)
    except (KombuError, redis.RedisError, OSError) as exc:
        log.warning("realtime_lane_event_unsent", event_type=kind, task_id=fields.get("uuid"), error_type=type(exc).__name__)


def _send_received(events: Any, task_id: str, name: str, request: Mapping[str, Any]) -> None:
    """``task-received`` as Celery's consumer sends it (its eta and expires: the headers'
    ISO 8601 times)."""
    _send(
        events,
        "task-received",
        uuid=task_id,
        name=name,
        args=request.get("argsrepr"),
        kwargs=request.get("kwargsrepr"),
        root_id=request.get("root_id"),
        parent_id=request.get("parent_id"),
        retries=request.get("retries") or 0,
        eta=request.get("eta"),
        expires=request.get("expires"),
    )


def _send_outcome(events: Any, task_id: str, failed: int, result: Any, runtime: float) -> None:
    """What Celery's request sends once its task has run (``Request.on_success`` and
    ``on_failure``): ``result`` is the return value's repr, or the exception's info."""
    if not failed:
        _send(events, "task-succeeded", uuid=task_id, result=result, runtime=runtime)
        return
    exc = result.exception
    if isinstance(exc, ExceptionWithTraceback):
        exc = exc.exc
    if isinstance(exc, Ignore):
        return
    if isinstance(exc, Retry):
        _send(events, "task-retried", uuid=task_id, exception=saferepr(exc.exc), traceback=str(result.traceback))
        return
    _send(events, "task-failed", uuid=task_id, exception=saferepr(get_pickled_exception(result.exception)), traceback=result.traceback)


class Refused(Exception):
    """A message the lane drops: ``event`` is what is logged."""

    def __init__(self, event: str, reason: str) -> None:
        super().__init__(reason)
        self.event = event


class Lane:
    """``threads`` threads taking turns at one ``BRPOP`` connection (leader and followers).

    One thread at a time, the leader, waits on ``keys``. Once it has popped a message it
    makes the follower that went idle last the leader and runs the message itself: no
    hand-off before the task starts, and the threads that ran the last tasks run the
    next ones. That keeps the fewest threads busy at low load, so their per-thread
    state stays warm: each thread's event loop and its pooled connections to the
    providers (which would be closed as idle if every thread took its turn, as
    ``BRPOP`` serves whichever of its waiters waited longest). When every thread is
    busy, no one waits on the list; the first to finish does."""

    def __init__(
        self,
        app: Celery,
        *,
        url: str,
        keys: tuple[str, ...],
        threads: int,
        hostname: str,
        socket_timeout_s: float,
        events: Callable[[], Any] | None = None,
    ) -> None:
        if threads < 1 or not keys:
            raise ValueError("a lane needs at least one thread and one list")
        self.app = app
        self.events = events  # the worker's event dispatcher, when it has one (it is made when its consumer starts)
        self.url = url
        self.keys = keys
        self.hostname = hostname
        self.socket_timeout_s = socket_timeout_s
        self.poll_s = POLL_S
        self._count = threads
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._leader: int | None = None
        self._followers: list[int] = []  # a stack: the last to go idle leads next
        self._turn = [threading.Event() for _ in range(threads)]
        self._client: redis.Redis | None = None  # the leader's; passed on with the lead
        self._client_id: int | None = None  # its CLIENT ID, for _unblock
        self._failing = False
        self._wait_s = BACKOFF_S[0]

    # --- the worker's side: start, stop --------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        self._threads = [threading.Thread(target=self.serve, args=(n,), name=f"realtime-lane-{n}", daemon=True) for n in range(self._count)]
        for thread in self._threads:
            thread.start()
        log.info("realtime_lane_started", threads=self._count, lists=list(self.keys))

    def stop(self) -> None:
        """Warm: each thread finishes its task; the one waiting on ``BRPOP`` is unblocked."""
        self._release()
        for thread in self._threads:
            thread.join()
        self._close()
        log.info("realtime_lane_stopped")

    def terminate(self) -> None:
        """Cold: nothing waited for (the threads are daemons and die with the process)."""
        self._release()

    def _release(self) -> None:
        with self._lock:  # against a thread about to wait for its turn (_await_turn)
            self._stopping.set()
            for turn in self._turn:
                turn.set()
            client_id = self._client_id
        if client_id is None:
            return
        control = redis.Redis.from_url(self.url, socket_timeout=self.socket_timeout_s, socket_connect_timeout=self.socket_timeout_s)
        try:
            control.client_unblock(client_id)
        except redis.RedisError as exc:  # the leader then notices the stop within POLL_S
            log.warning("realtime_lane_unblock_failed", error_type=type(exc).__name__)
        finally:
            control.close()

    # --- the threads --------------------------------------------------------------------

    def serve(self, n: int) -> None:
        while self._await_turn(n):
            item = self._pop()
            if item is None:
                continue  # nothing within the poll (or a broker failure): still the leader
            self._pass_lead(n)
            self.run(item)
        self._pass_lead(n)

    def _await_turn(self, n: int) -> bool:
        """Lead, or wait to be made the leader; False once the lane stops."""
        with self._lock:
            if self._stopping.is_set():
                return False
            if self._leader is None:
                self._leader = n
            if self._leader == n:
                return True
            self._turn[n].clear()
            self._followers.append(n)
        self._turn[n].wait()
        return not self._stopping.is_set()

    def _pass_lead(self, n: int) -> None:
        """Thread ``n`` stops leading: the follower that went idle last leads (or no one)."""
        with self._lock:
            if self._leader != n:
                return
            self._leader = self._followers.pop() if self._followers else None
            if self._leader is not None:
                self._turn[self._leader].set()

    def _pop(self) -> bytes | None:
        """One ``BRPOP`` by the leader; a broker failure is logged once and waited out."""
        try:
            if self._client is None:
                self._connect()
            if self._failing:
                log.info("realtime_lane_broker_back")
                self._failing, self._wait_s = False, BACKOFF_S[0]
            reply = None if self._stopping.is_set() or self._client is None else self._client.brpop(list(self.keys), timeout=self.poll_s)
        except redis.RedisError as exc:
            self._close()
            if not self._failing:
                log.warning("realtime_lane_broker_unavailable", error_type=type(exc).__name__, error=str(exc)[:200])
            self._failing = True
            self._stopping.wait(self._wait_s)
            self._wait_s = min(self._wait_s * 2, BACKOFF_S[1])
            return None
        if reply is None:
            return None
        item = reply[1]
        return item.encode() if isinstance(item, str) else item

    def _connect(self) -> None:
        client = redis.Redis.from_url(
            self.url,
            single_connection_client=True,  # connected here: the connection whose CLIENT ID _release names
            socket_timeout=self.poll_s + self.socket_timeout_s,
            socket_connect_timeout=self.socket_timeout_s,
            retry=None,
            client_name=f"realtime-lane:{self.hostname}",
        )
        try:
            client_id = int(client.client_id())
        except redis.RedisError:
            client.close()
            raise
        with self._lock:
            self._client, self._client_id = client, client_id

    def _close(self) -> None:
        with self._lock:
            client, self._client, self._client_id = self._client, None, None
        if client is not None:
            client.close()

    def run(self, raw: bytes) -> None:
        """Run one message as Celery's thread pool would; refused ones are logged."""
        try:
            name, task_id, request, body, content_type, content_encoding = self.decode(raw)
            events = self._task_events(name)
            if events is not None:
                _send_received(events, task_id, name, request)
                _send(events, "task-started", uuid=task_id)
            failed, result, runtime = trace_task_ret(name, task_id, request, body, content_type, content_encoding, app=self.app)
            if events is not None:
                _send_outcome(events, task_id, failed, result, runtime)
        except Refused as refused:
            event, reason = refused.event, str(refused)
        except KombuError as exc:  # the body: not JSON, or a content type this app does not accept
            event, reason = "realtime_lane_message_invalid", f"{type(exc).__name__}: {exc}"[:300]
        except Exception as exc:  # boundary: a lane thread outlives any one message
            log.exception("realtime_lane_message_failed", error_type=type(exc).__name__)
            return
        else:
            return
        log.error(event, reason=reason, outcome="dropped")

    def _task_events(self, name: str) -> Any | None:
        """The worker's event dispatcher, if it sends task events and the task does."""
        dispatcher = self.events() if self.events is not None else None
        if dispatcher is None or not dispatcher.enabled or not self.app.tasks[name].send_events:
            return None
        return dispatcher

    def decode(self, raw: bytes) -> tuple[str, str, dict[str, Any], bytes | str, str, str]:
        """kombu's envelope and Celery's task message protocol 2, as Celery's consumer reads
        them: the task's name and id, the request (its headers and delivery), the body."""
        try:
            payload = json.loads(raw)
            headers, properties = dict(payload["headers"]), dict(payload["properties"])
            name, task_id = str(headers["task"]), str(headers["id"])
            body: bytes | str = payload["body"]
            if properties.get("body_encoding") == "base64":
                body = base64.b64decode(body, validate=True)
            content_type, content_encoding = str(payload["content-type"]), str(payload["content-encoding"])
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise Refused("realtime_lane_message_invalid", f"not a task message: {type(exc).__name__}") from None
        if name not in self.app.tasks:
            raise Refused("realtime_lane_task_unregistered", f"task {name!r} ({task_id}) is not registered")
        if task_id in worker_state.revoked:
            raise Refused("realtime_lane_task_revoked", f"task {task_id} was revoked")
        now = datetime.now(UTC)
        expires = self._when(headers, "expires", task_id)
        if expires is not None and expires <= now:
            raise Refused("realtime_lane_task_expired", f"task {task_id} expired at {headers['expires']}")
        eta = self._when(headers, "eta", task_id)
        if eta is not None and eta > now:
            raise Refused("realtime_lane_task_refused", f"task {task_id} has an ETA ({headers['eta']}): real-time tasks are not scheduled")
        info = properties.get("delivery_info") or {}
        request = {
            **headers,
            "properties": properties,
            "reply_to": properties.get("reply_to"),
            "correlation_id": properties.get("correlation_id"),
            "hostname": self.hostname,
            "delivery_info": {
                "exchange": info.get("exchange"),
                "routing_key": info.get("routing_key"),
                "priority": properties.get("priority"),
                "redelivered": False,
            },
        }
        return name, task_id, request, body, content_type, content_encoding

    @staticmethod
    def _when(headers: Mapping[str, Any], field: str, task_id: str) -> datetime | None:
        value = headers.get(field)
        if not value:
            return None
        try:
            when = maybe_iso8601(str(value))
        except (ValueError, OverflowError):
            raise Refused("realtime_lane_message_invalid", f"task {task_id}: {field} {value!r} is not a time") from None
        if when is None:
            return None
        return when if when.tzinfo else when.replace(tzinfo=UTC)


class LaneStep(bootsteps.StartStopStep):
    """The worker's bootstep: decides whether the lane serves ``realtime`` here, and if
    so takes the queue from the worker's Celery consumer before that starts."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.keys, self.reason = self.applies(parent)
        self.enabled = self.keys is not None
        if not self.enabled:
            log.info("realtime_lane_off", reason=self.reason)

    @staticmethod
    def applies(worker: Any) -> tuple[tuple[str, ...] | None, str]:
        """The lists the lane pops on this worker, or None and why not."""
        from django.conf import settings

        from pipeline.queues import Queue

        queue = Queue.REALTIME.value
        if not settings.REALTIME_LANE:
            return None, "REALTIME_LANE is off"
        if set(worker.app.amqp.queues.consume_from) != {queue}:
            return None, f"the worker does not consume {queue!r} alone"
        if not (isinstance(worker.pool_cls, type) and issubclass(worker.pool_cls, ThreadPool)):
            return None, "the worker's pool is not the thread pool"
        keys = lane_keys(worker.app.conf.broker_read_url or "", worker.app.conf.broker_transport_options or {}, queue)
        return keys, "" if keys is not None else "the broker is not one Redis server"

    def create(self, parent: Any) -> Lane:  # type: ignore[override]  # celery's stubs say None; a StartStopStep keeps what create returns
        from pipeline.queues import Queue

        conf = parent.app.conf
        parent.app.amqp.queues.deselect([Queue.REALTIME.value])  # Celery's consumer keeps control commands only
        return Lane(
            parent.app,
            url=conf.broker_read_url,  # what Celery's consumer would read from (CELERY_BROKER_URL, or a read URL of its own)
            keys=self.keys or (),
            threads=int(parent.concurrency),
            hostname=parent.hostname,
            socket_timeout_s=float((conf.broker_transport_options or {}).get("socket_timeout", 5)),
            events=lambda: getattr(getattr(parent, "consumer", None), "event_dispatcher", None),
        )
