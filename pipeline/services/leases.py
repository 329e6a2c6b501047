"""Leases: how a request whose run died is noticed and run again, or failed.

A run renews the lease of the request it holds while it runs: ``LeaseKeeper``
renews every lease of its process in one round trip, from a thread of its own,
every third of ``limits.run_lease_s``. A message that a worker has received but
not yet begun (it waits for a free thread) is held the same way, so a worker
that dies with messages in its prefetch releases them within a lease too. When
the process dies, its renewals stop and the leases lapse.

``sweep`` decides every lapsed lease (``tokenbus.fencing.lapse``: publish the
next attempt, or fail the request with ``worker_lost`` or ``worker_timeout``).
Each real-time worker sweeps once a second; the decision is one Lua script, so
two sweepers never decide one lease twice.
"""

from __future__ import annotations

import contextlib
import threading
import time

import structlog

from orchestrator_site.errors import RequestCancelled, ServiceUnavailable
from pipeline.config import PipelineSettings, get_config
from pipeline.resilience.local import shared_state
from pipeline.services import budgets, gates
from pipeline.tokenbus import fencing, get_bus
from pipeline.tokenbus.fencing import Lapsed, LapseOutcome, Run

log = structlog.get_logger("pipeline.leases")

SWEEP_INTERVAL_S = 1.0


class LeaseKeeper:
    """This process's runs (and received messages), their leases renewed together."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, int], Run] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, run: Run) -> None:
        with self._lock:
            self._held[(run.request_id, run.attempt)] = run
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._renew_forever, name="lease-keeper", daemon=True)
                self._thread.start()

    def release(self, run: Run) -> None:
        """Stop renewing ``run``'s lease (the message it held, if ``run`` has no owner yet)."""
        with self._lock:
            held = self._held.get((run.request_id, run.attempt))
            if held is not None and (not run.owner or held.owner == run.owner):
                del self._held[(run.request_id, run.attempt)]

    def release_messages_of(self, request_id: str) -> None:
        """Stop renewing the leases of every message of the request that no run has begun."""
        with self._lock:
            for key, held in list(self._held.items()):
                if held.request_id == request_id and not held.owner:
                    del self._held[key]

    def held(self) -> list[Run]:
        with self._lock:
            return list(self._held.values())

    def renew_now(self, lease_s: float | None = None) -> int:
        """One renewal of every held lease; how many were still current."""
        runs = self.held()
        if not runs:
            return 0
        return fencing.renew(get_bus(), runs, lease_s=lease_s or get_config().limits.run_lease_s)

    def _renew_forever(self) -> None:
        while True:
            lease_s = get_config().limits.run_lease_s
            time.sleep(lease_s / 3)
            try:
                self.renew_now(lease_s)
            except ServiceUnavailable as exc:
                # Redis is away: the leases may lapse; the sweep decides them once it is back.
                log.warning("lease_renewal_failed", outcome="error", error_type=type(exc.__cause__ or exc).__name__, held=len(self.held()))


keeper = LeaseKeeper()


def sweep(config: PipelineSettings | None = None, *, now: float | None = None) -> list[Lapsed]:
    """Decide every lapsed lease, and act on each decision."""
    config = config or get_config()
    bus = get_bus()
    decided = []
    for request_id in fencing.lapsed(bus, now=time.time() if now is None else now):
        lapsed = fencing.lapse(bus, request_id, next_lease_s=config.limits.queue_lease_s, max_runs=config.limits.max_runs)
        if lapsed.outcome in (LapseOutcome.ALIVE, LapseOutcome.GONE):
            continue
        decided.append(lapsed)
        _act_on(lapsed, config)
    return decided


def _act_on(lapsed: Lapsed, config: PipelineSettings) -> None:
    fields = {"request_id": lapsed.request_id, "tenant_id": lapsed.tenant_id, "attempt": lapsed.attempt}
    if lapsed.outcome is LapseOutcome.REPUBLISH:
        log.warning("lease_lapsed", **fields, outcome="republished")
        from pipeline.services.start import realtime_publish

        # If the broker is down, the lease lapses again and the next sweep publishes the next attempt.
        with contextlib.suppress(ServiceUnavailable):
            realtime_publish(lapsed.request_id, lapsed.attempt, queue_lease_s=config.limits.queue_lease_s)
        return
    log.warning("lease_lapsed", **fields, outcome="failed", error_code="worker_lost" if lapsed.outcome is LapseOutcome.LOST else "worker_timeout")
    release_gates(lapsed.request_id, lapsed.tenant_id, lapsed.dedup_key, config)


def release_gates(request_id: str, tenant_id: str, key: str, config: PipelineSettings) -> None:
    """A failed request's admission slot, its deduplication claim (errors are not
    served to others) and its budget reservation."""
    gates.admission(config).release(tenant_id, request_id)
    budgets.release(request_id)
    if key:
        gates.dedup_store(config).abandon(key, request_id)


def message_received(request_id: str, attempt: int) -> None:
    """A worker holds the request's message until a thread begins it: its lease is renewed meanwhile."""
    keeper.hold(Run(request_id, attempt))


def message_revoked(request_id: str) -> None:
    """A worker dropped the request's message, revoked: no later attempt may run it either."""
    keeper.release_messages_of(request_id)
    config = get_config()
    failed = fencing.fail(get_bus(), request_id, RequestCancelled("the request was revoked", data={"request_id": request_id}))
    if failed is not None:
        log.warning("request_revoked", request_id=request_id, outcome="cancelled")
        release_gates(request_id, failed[0], failed[1], config)


def sweep_safely() -> None:
    """``sweep``, for a timer: a failure is logged and the next tick tries again."""
    if not shared_state.available():
        return
    try:
        sweep()
    except ServiceUnavailable as exc:
        log.warning("lease_sweep_failed", outcome="error", error_type=type(exc.__cause__ or exc).__name__)
