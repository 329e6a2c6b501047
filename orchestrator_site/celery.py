"""The one Celery app. Queues are declared from ``pipeline.queues.Queue``."""

from __future__ import annotations

import os
from typing import Any

import structlog
from celery import Celery, bootsteps
from celery.signals import beat_init, celeryd_init, task_received, task_revoked, worker_process_init, worker_process_shutdown, worker_ready
from kombu import Exchange
from kombu import Queue as KombuQueue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_site.settings")

app = Celery("orchestrator_site")
app.config_from_object("django.conf:settings", namespace="CELERY")


def _declare_queues() -> None:
    from pipeline.queues import TASK_ROUTES, Queue

    exchange = Exchange("orchestrator", type="direct")
    app.conf.update(
        task_queues=tuple(KombuQueue(q.value, exchange, routing_key=q.value) for q in Queue),
        # Nothing may land on Celery's implicit "celery" queue, which no worker here consumes.
        task_default_queue=Queue.BATCH_DEFAULT.value,
        task_default_exchange=exchange.name,
        task_default_routing_key=Queue.BATCH_DEFAULT.value,
        task_routes=TASK_ROUTES,
    )


_declare_queues()
app.autodiscover_tasks(["pipeline", "batches"])
log = structlog.get_logger("orchestrator_site.celery")
REALTIME_TASK = "pipeline.tasks.run_realtime"


class LeaseSweep(bootsteps.StartStopStep):
    """A real-time worker sweeps lapsed leases every second, on the worker's timer
    (``pipeline.services.leases``): every real-time worker does, so the sweep lives as
    long as any of them does, and its decisions are atomic in Redis."""

    requires = ("celery.worker.components:Timer",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def start(self, worker: Any) -> None:
        from pipeline.queues import Queue
        from pipeline.services import leases

        if Queue.REALTIME.value in worker.app.amqp.queues.consume_from:
            self.tref = worker.timer.call_repeatedly(leases.SWEEP_INTERVAL_S, leases.sweep_safely, priority=10)

    def stop(self, worker: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None


app.steps["worker"].add(LeaseSweep)


def _run_of(request: Any) -> tuple[str, int] | None:
    """A received ``run_realtime`` message's (request id, attempt), or None for any other task."""
    if getattr(request, "name", None) != REALTIME_TASK:
        return None
    args = list(getattr(request, "args", None) or [])
    if len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], int):
        return args[0], args[1]
    return None


@task_received.connect
def _hold_received(request: Any = None, **_: Any) -> None:
    run = _run_of(request)
    if run is not None:
        from pipeline.services import leases

        leases.message_received(*run)


@task_revoked.connect
def _fail_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    """A dropped ``run_realtime`` message (its task id is its request's id)."""
    request_id = getattr(request, "id", None)
    if getattr(sender, "name", None) != REALTIME_TASK or not isinstance(request_id, str):
        return
    from orchestrator_site.errors import OrchestratorError
    from pipeline.services import leases

    try:
        leases.message_revoked(request_id)
    except OrchestratorError as exc:  # a signal receiver: Celery would only log it
        log.warning("request_revoke_unrecorded", request_id=request_id, outcome="error", error_code=exc.code)


@worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    from django.conf import settings

    from orchestrator_site.metrics import serve_worker_metrics

    if settings.WORKER_METRICS_PORT:
        serve_worker_metrics(settings.WORKER_METRICS_PORT, settings.WORKER_METRICS_ADDR)


@worker_ready.connect
@worker_process_init.connect  # a prefork pool's process, after the fork
def _settle(**_: Any) -> None:
    from orchestrator_site import gctune

    gctune.settle()


@worker_process_shutdown.connect
def _forget_process(pid: int | None = None, **_: Any) -> None:
    from orchestrator_site.metrics import mark_process_dead

    mark_process_dead(pid or os.getpid())


def worker_queues(options: dict[str, Any]) -> set[str]:
    raw = options.get("queues") or []
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    return {str(q).strip() for q in items if str(q).strip()}


@celeryd_init.connect
def _realtime_is_at_most_once(conf: Any = None, options: dict[str, Any] | None = None, **_: Any) -> None:
    """A worker that consumes only ``realtime`` takes its messages off the Redis
    broker without kombu's ack emulation (a documented transport option). A
    real-time message is acknowledged when it starts anyway, and a run that dies is
    noticed by its lease, not by the broker; the emulation's bookkeeping is what
    crashes a worker whose Redis goes away with a message unacked (kombu:
    "'NoneType' object has no attribute 'hostname'" while restoring it)."""
    from pipeline.queues import Queue

    if conf is not None and worker_queues(options or {}) == {Queue.REALTIME.value}:
        conf.broker_transport_options = {**conf.broker_transport_options, "ack_emulation": False}


@celeryd_init.connect
def _config_at_start(conf: Any = None, options: dict[str, Any] | None = None, **_: Any) -> None:
    """A worker runs the active config version (``pipeline.config.reload``), and its
    concurrency comes from ``[queues]``, by the queues it consumes: Celery's documented
    way to configure one worker. Its setting applies where the command line gives no ``-c``."""
    from pipeline.config import get_config
    from pipeline.config.reload import config_start
    from pipeline.queues import Queue

    queues = worker_queues(options or {})
    realtime = queues == {Queue.REALTIME.value}
    config_start("worker-realtime" if realtime else "worker-batch" if queues else "worker")
    if conf is None:
        return
    bounds = get_config().queues
    if realtime:
        conf.worker_concurrency = bounds.realtime_concurrency
    elif queues and Queue.REALTIME.value not in queues:
        conf.worker_concurrency = bounds.batch_concurrency


@worker_process_init.connect
def _follow_config_in_child(**_: Any) -> None:
    """A prefork child follows the config itself: the parent's thread stayed behind."""
    from pipeline.config.reload import start_following

    start_following()


@beat_init.connect
def _config_in_scheduler(**_: Any) -> None:
    """The scheduler runs the active config, and imports the file whenever it is saved."""
    from django.conf import settings

    from pipeline.config.reload import FileWatcher, config_start

    config_start("beat")
    if settings.PIPELINE_CONFIG_FOLLOW:
        FileWatcher(settings.PIPELINE_CONFIG_PATH).start()


@beat_init.connect
def _scaling_signals(**_: Any) -> None:
    """The scaling signals are computed here, in the one scheduler, and exported on its
    metrics port (``WORKER_METRICS_PORT``, as a worker's) when one is set."""
    from django.conf import settings

    from orchestrator_site.metrics import serve_worker_metrics
    from orchestrator_site.scaling import ScalingLoop, read_load

    if settings.SCALING_INTERVAL_S > 0:
        ScalingLoop(read_load, interval_s=settings.SCALING_INTERVAL_S).start()
    if settings.WORKER_METRICS_PORT:
        serve_worker_metrics(settings.WORKER_METRICS_PORT, settings.WORKER_METRICS_ADDR)
