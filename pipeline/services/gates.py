"""The gates a request passes, each shared by every process through Redis and kept
by this process alone while Redis is down (``resilience.local``): the tenant's rate
limits, admission to the bounded real-time queue, deduplication, and each worker's
circuit breaker. Services build them here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import cast

import structlog

from orchestrator_site.errors import CircuitOpen, ContextLengthExceeded, OrchestratorError, Overloaded, PermanentWorkerError, RateLimited, TransientWorkerError
from pipeline import metrics
from pipeline.config import PipelineSettings, get_config
from pipeline.models import Tenant
from pipeline.resilience.admission import Admission
from pipeline.resilience.breaker import BreakerPolicy, CircuitBreaker
from pipeline.resilience.dedup import DedupStore
from pipeline.resilience.local import LocalAdmission, LocalBreaker, LocalDedup, LocalRateLimiter, WithFallback
from pipeline.resilience.ratelimit import WINDOW_S as RATE_WINDOW_S
from pipeline.resilience.ratelimit import RateLimiter, TenantRates
from pipeline.routing import worker_config
from pipeline.shared_redis import get_redis
from pipeline.types import PipelineResult, PromptRequest

log = structlog.get_logger("pipeline.services")

# How long the gateway waits past a request's deadline for the run's own
# ``worker_timeout`` to arrive, before it gives up itself.
DEADLINE_GRACE_S = 2.0

# This process's copies of the shared state, used while Redis is down.
_local_limiter = LocalRateLimiter()
_local_admission = LocalAdmission(max_global=0, max_per_tenant=0, lease_s=0)
_local_dedup = LocalDedup()


def admission_bounds(config: PipelineSettings | None = None) -> tuple[int, int, float]:
    """The real-time queue's bounds: global, per tenant, and a slot's lease in seconds.
    A slot whose release never came (its run and the lease sweep both gone) frees
    itself a little after the longest a request can live."""
    limits = (config or get_config()).limits
    return limits.max_inflight_global, limits.max_inflight_per_tenant, limits.request_timeout_s + DEADLINE_GRACE_S + 30.0


def shared_admission(config: PipelineSettings | None = None) -> Admission:
    max_global, max_per_tenant, lease_s = admission_bounds(config)
    shared = get_redis()
    return Admission(shared.client, prefix=shared.prefix, max_global=max_global, max_per_tenant=max_per_tenant, lease_s=lease_s)


def admission(config: PipelineSettings | None = None) -> Admission:
    shared = shared_admission(config)
    local = _local_admission.configure(max_global=shared.max_global, max_per_tenant=shared.max_per_tenant, lease_s=shared.lease_s)
    return cast(Admission, WithFallback(shared, local))


def shared_dedup(config: PipelineSettings) -> DedupStore:
    shared = get_redis()
    return DedupStore(shared.client, prefix=shared.prefix, window_s=config.dedup.window_s, max_entries=config.dedup.max_entries)


def dedup_store(config: PipelineSettings) -> DedupStore:
    shared = shared_dedup(config)
    return cast(DedupStore, WithFallback(shared, _local_dedup.configure(window_s=shared.window_s, max_entries=shared.max_entries)))


def shared_limiter() -> RateLimiter:
    shared = get_redis()
    return RateLimiter(shared.client, prefix=shared.prefix)


def rate_limiter() -> RateLimiter:
    return cast(RateLimiter, WithFallback(shared_limiter(), _local_limiter))


def tenant_rates(tenant: Tenant, config: PipelineSettings | None = None) -> TenantRates:
    """The tenant's own limits, or the configured defaults where it has none."""
    defaults = (config or get_config()).rate_limits
    return TenantRates(
        requests_per_minute=defaults.requests_per_minute if tenant.requests_per_minute is None else tenant.requests_per_minute,
        tokens_per_minute=defaults.tokens_per_minute if tenant.tokens_per_minute is None else tenant.tokens_per_minute,
    )


def rate_limited(kind: str, retry_after_s: float, rates: TenantRates) -> RateLimited:
    metrics.child(metrics.RATE_LIMITED, kind).inc()
    limit = getattr(rates, kind)  # the verdict's kind names the limit's field
    return RateLimited(
        f"rate limit reached: {limit} {kind.replace('_', ' ')}",
        data={"limit": limit, "kind": kind, "window_s": int(RATE_WINDOW_S)},
        retry_after=retry_after_s,
    )


def shed(scope: str, *, max_global: int, max_per_tenant: int) -> Overloaded:
    metrics.child(metrics.REQUESTS_SHED, scope).inc()
    limit = max_per_tenant if scope == "tenant" else max_global
    # Shed at once rather than queue without bound: the client retries, nothing waits here.
    return Overloaded(f"the {scope} real-time queue is full ({limit} requests in flight)", data={"scope": scope, "limit": limit}, retry_after=1.0)


def breaker_for(config: PipelineSettings, worker: str) -> CircuitBreaker:
    # A worker unknown here was routed on a config this process does not have (a
    # rollout): UnknownWorker, answered as the gateway would.
    settings = worker_config(config, worker).breaker
    policy = BreakerPolicy(failure_threshold=settings.failure_threshold, open_s=settings.open_s, half_open_trials=settings.half_open_trials)
    shared = get_redis()
    breaker = CircuitBreaker(shared.client, prefix=shared.prefix, worker=worker, policy=policy)
    return cast(CircuitBreaker, WithFallback(breaker, LocalBreaker(worker=worker, policy=policy)))


def _route_around_open_circuits(request: PromptRequest, config: PipelineSettings) -> PromptRequest:
    """The request as it will run: on its worker, on the fallback while the worker's
    circuit is open, or not at all (CircuitOpen: fail fast, no upstream call)."""
    permission = breaker_for(config, request.worker).allow()
    if permission.allowed:
        return request
    fallback = config.workers[request.worker].fallback
    if fallback and breaker_for(config, fallback).allow().allowed:
        log.warning("circuit_fallback", request_id=request.request_id, worker=request.worker, fallback=fallback, outcome="fallback")
        return dataclasses.replace(request, worker=fallback, model=config.workers[fallback].model_default)
    raise CircuitOpen(
        f"worker {request.worker!r} is failing and its circuit is {permission.state.name.lower().replace('_', '-')}",
        data={"worker": request.worker, "state": permission.state.name.lower()},
        retry_after=permission.retry_after_s or None,
    )


def run_guarded(request: PromptRequest, config: PipelineSettings, run: Callable[[PromptRequest], PipelineResult]) -> PipelineResult:
    """``run`` the request behind its worker's circuit breaker: on the fallback (or
    refused) while the circuit is open, and the outcome recorded. Real-time runs and
    batch items both go through here."""
    request = _route_around_open_circuits(request, config)
    try:
        result = run(request)
    except TransientWorkerError as exc:
        _breaker_of(config, request, exc).record(success=False)
        raise
    except (PermanentWorkerError, ContextLengthExceeded) as exc:
        _breaker_of(config, request, exc).record(success=True)  # the provider is up: it answered, if only to refuse
        raise
    # The worker that answered: the last one, when the answer failed over mid-stream (the
    # ones that failed were recorded as they did, by ``services.failover``).
    breaker_for(config, result.worker).record(success=True)
    return result


def _breaker_of(config: PipelineSettings, request: PromptRequest, error: OrchestratorError) -> CircuitBreaker:
    """The breaker of the worker an error came from: the request's, or the fallback's
    that failed in its turn after a failover (its name in the error's data)."""
    named = error.data.get("worker")
    return breaker_for(config, named if isinstance(named, str) and named in config.workers else request.worker)


def local_dedup(config: PipelineSettings) -> LocalDedup:
    return _local_dedup.configure(window_s=config.dedup.window_s, max_entries=config.dedup.max_entries)


def local_admission(config: PipelineSettings) -> LocalAdmission:
    max_global, max_per_tenant, lease_s = admission_bounds(config)
    return _local_admission.configure(max_global=max_global, max_per_tenant=max_per_tenant, lease_s=lease_s)


def local_limiter() -> LocalRateLimiter:
    return _local_limiter
