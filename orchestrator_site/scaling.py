"""The scaling signals in the scheduler (``pipeline.scaling`` decides): each queue's
work and the live workers that consume it, read every ``SCALING_INTERVAL_S`` by
``ScalingLoop``, which exports the gauges.

- Work: the real-time requests admitted and not finished (Redis: they include the
  ones queued on the broker); for a batch queue, its chunks waiting on the broker
  plus those running.
- Workers: Celery's own view of them (``inspect``: each worker's queues, its pool's
  concurrency, its running tasks), asked once per reading with a short timeout.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from pipeline.queues import Queue
from pipeline.scaling import Decision, Load, QueueScaler, ScalingPolicy

log = structlog.get_logger("pipeline.scaling")

INSPECT_TIMEOUT_S = 1.0


def read_load(app: Any | None = None) -> dict[str, Load]:
    """Each queue's ``Load`` now."""
    from orchestrator_site.celery import app as celery_app
    from orchestrator_site.metrics import queue_depths
    from pipeline.services.gates import admission

    inspect = (app or celery_app).control.inspect(timeout=INSPECT_TIMEOUT_S)
    consumed = inspect.active_queues() or {}
    stats = inspect.stats() or {}
    active = inspect.active() or {}
    return loads(consumed=consumed, stats=stats, active=active, depths=queue_depths(), realtime_in_flight=admission().in_flight())


def loads(
    *,
    consumed: Mapping[str, Any],
    stats: Mapping[str, Any],
    active: Mapping[str, Any],
    depths: Mapping[str, int],
    realtime_in_flight: int,
) -> dict[str, Load]:
    """The loads from what Celery and the broker said (a function of its inputs alone)."""
    workers: Counter[str] = Counter()
    slots: dict[str, int] = {}
    for node, queues in consumed.items():
        concurrency = int(stats.get(node, {}).get("pool", {}).get("max-concurrency") or 1)
        for queue in {str(q.get("name")) for q in queues}:
            if queue in Queue._value2member_map_:
                workers[queue] += 1
                slots[queue] = max(slots.get(queue, 0), concurrency)
    running: Counter[str] = Counter(str(task.get("delivery_info", {}).get("routing_key")) for tasks in active.values() for task in tasks)
    result = {}
    for queue in Queue:
        work = realtime_in_flight if queue is Queue.REALTIME else depths.get(queue.value, 0) + running[queue.value]
        result[queue.value] = Load(work=work, workers=workers[queue.value], slots_per_worker=slots.get(queue.value, 0))
    return result


class ScalingLoop:
    """Every ``interval_s``: read each queue's load (``read``), decide, and set the
    gauges. Runs in a daemon thread of the scheduler; a reading that fails is logged
    and the gauges keep their last values."""

    def __init__(
        self,
        read: Callable[[], Mapping[str, Load]],
        *,
        interval_s: float = 5.0,
        policy: ScalingPolicy | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._read = read
        self.interval_s = interval_s
        self._policy = policy or ScalingPolicy()
        self._clock = clock or time.monotonic
        self.scalers: dict[str, QueueScaler] = {}
        self._stop = threading.Event()

    def tick(self) -> dict[str, Decision]:
        from pipeline import metrics

        decisions = {}
        for queue, load in self._read().items():
            scaler = self.scalers.setdefault(queue, QueueScaler(self._policy))
            decision = decisions[queue] = scaler.observe(load, self._clock())
            metrics.child(metrics.QUEUE_UTILIZATION, queue).set(decision.utilization if math.isfinite(decision.utilization) else 1e9)
            metrics.child(metrics.SCALING_SIGNAL, queue).set(int(decision.signal))
            metrics.child(metrics.DESIRED_WORKERS, queue).set(decision.desired_workers)
        return decisions

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="scaling", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        from kombu.exceptions import OperationalError as KombuOperationalError

        from orchestrator_site.errors import OrchestratorError

        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            # Redis (ServiceUnavailable), the broker (kombu's, or a socket's) down: the
            # gauges keep their last values until a reading succeeds.
            except (OrchestratorError, KombuOperationalError, OSError) as exc:
                log.warning("scaling_unread", outcome="error", error_type=type(exc).__name__)
