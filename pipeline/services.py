"""Writes and orchestration of the real-time path. Views, tasks and commands call these."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, cast

import redis
import structlog
from asgiref.sync import sync_to_async
from celery.exceptions import SoftTimeLimitExceeded
from django.db import DatabaseError, close_old_connections, connection
from kombu.exceptions import OperationalError as KombuOperationalError

from orchestrator_site import telemetry
from orchestrator_site.errors import (
    CircuitOpen,
    InvalidRequest,
    NotFound,
    OrchestratorError,
    Overloaded,
    PermanentWorkerError,
    RateLimited,
    RequestCancelled,
    RequestTimeout,
    ServiceUnavailable,
    TransientWorkerError,
)
from pipeline import metrics, presence, selectors
from pipeline.config import PipelineSettings, get_config
from pipeline.engine import PipelineDeps, run_pipeline
from pipeline.intake import BrokerQueue, Intake, TaskMessages
from pipeline.intake import Limits as IntakeLimits
from pipeline.models import Document, SessionTurn, Tenant
from pipeline.queues import Queue
from pipeline.resilience.admission import Admission
from pipeline.resilience.breaker import BreakerPolicy, CircuitBreaker, Permission
from pipeline.resilience.dedup import DedupStore, dedup_key
from pipeline.resilience.local import LocalAdmission, LocalBreaker, LocalDedup, LocalRateLimiter, WithFallback, shared_state
from pipeline.resilience.ratelimit import WINDOW_S as RATE_WINDOW_S
from pipeline.resilience.ratelimit import RateLimiter, TenantRates
from pipeline.routing import route_request, worker_config, worker_pool
from pipeline.stages.rag import RetrievalResult, search_args
from pipeline.tokenbus import TokenBus, get_bus
from pipeline.types import ChatMessage, PipelineResult, PromptRequest, TokenChunk

log = structlog.get_logger("pipeline.services")


def infer_build_request(*, tenant_id: str, data: Mapping[str, Any], config: PipelineSettings) -> PromptRequest:
    """A routed ``PromptRequest`` from validated input (see ``api.serializers.InferInput``)."""
    route = route_request(config, worker=data.get("worker"), model=data.get("model"))
    max_tokens = max_tokens_for(config, data.get("max_tokens"))
    request_id = uuid.uuid4().hex
    return PromptRequest(
        request_id=request_id,
        tenant_id=tenant_id,
        session_id=data.get("session_id") or request_id,
        prompt=data["prompt"],
        worker=route.worker,
        model=route.model,
        max_tokens=max_tokens,
        temperature=data.get("temperature"),
        stop=tuple(data.get("stop") or ()),
        metadata=dict(data.get("metadata") or {}),
        history=tuple(ChatMessage(role, content) for role, content in data.get("history") or ()),
    )


def max_tokens_for(config: PipelineSettings, requested: int | None) -> int:
    """The request's ``max_tokens``: the configured default when absent, refused above the limit."""
    max_tokens = requested or config.limits.default_max_tokens
    if max_tokens > config.limits.max_tokens_limit:
        raise InvalidRequest(f"max_tokens may be at most {config.limits.max_tokens_limit}", data={"field": "max_tokens"})
    return max_tokens


# This process's copies of the shared state, used while Redis is down (resilience.local).
_local_limiter = LocalRateLimiter()
_local_admission = LocalAdmission(max_global=0, max_per_tenant=0, lease_s=0)
_local_dedup = LocalDedup()


def admission_bounds(config: PipelineSettings | None = None) -> tuple[int, int, float]:
    """The real-time queue's bounds: global, per tenant, and a slot's lease in seconds."""
    limits = (config or get_config()).limits
    # A slot whose release never came (a killed worker) frees itself after the
    # longest a request can live: the gateway's wait or the task's hard limit.
    return limits.max_inflight_global, limits.max_inflight_per_tenant, max(limits.request_timeout_s, 180.0) + 30.0


def admission(config: PipelineSettings | None = None) -> Admission:
    """The real-time queue's bounds, shared by every gateway process through Redis
    (this process's own count while Redis is down)."""
    shared = _shared_admission(config)
    local = _local_admission.configure(max_global=shared.max_global, max_per_tenant=shared.max_per_tenant, lease_s=shared.lease_s)
    return cast(Admission, WithFallback(shared, local))


def _shared_admission(config: PipelineSettings | None = None) -> Admission:
    max_global, max_per_tenant, lease_s = admission_bounds(config)
    return Admission(get_bus().client, prefix=get_bus().prefix, max_global=max_global, max_per_tenant=max_per_tenant, lease_s=lease_s)


@dataclasses.dataclass(frozen=True)
class Started:
    """How a request was answered at the gateway: ``submitted`` (a task runs it),
    ``attached`` (an identical request in flight will answer it), ``cached``
    (an identical request answered within the deduplication window) or
    ``inline`` (Redis is down: this process must run it, see ``infer_inline``)."""

    how: str
    request_id: str  # the request whose stream carries the answer
    result: PipelineResult | None = None


def dedup_store(config: PipelineSettings) -> DedupStore:
    shared = _shared_dedup(config)
    return cast(DedupStore, WithFallback(shared, _local_dedup.configure(window_s=shared.window_s, max_entries=shared.max_entries)))


def _shared_dedup(config: PipelineSettings) -> DedupStore:
    return DedupStore(get_bus().client, prefix=get_bus().prefix, window_s=config.dedup.window_s, max_entries=config.dedup.max_entries)


def infer_start(*, request: PromptRequest, rates: TenantRates | None = None) -> Started:
    """Deduplicate, or submit. Attached and cached answers cost no upstream call and
    are not counted against the tenant's rate limits. (The gateway's views call
    ``ainfer_start``: the same, on the event loop.)"""
    config = get_config()
    if not config.dedup.enabled:
        return Started("submitted" if infer_submit(request=request, rates=rates) else "inline", request.request_id)
    store = dedup_store(config)
    key = dedup_key(request)
    kind, value = store.claim(key, request.request_id)
    answered = _deduplicated(kind, value, key)
    if answered is not None:
        return answered
    try:
        submitted = infer_submit(request=request, rates=rates)
    except OrchestratorError:
        store.abandon(key, request.request_id)  # refused: whoever comes next must try for themselves
        raise
    return Started("submitted" if submitted else "inline", request.request_id)


async def ainfer_start(*, request: PromptRequest, rates: TenantRates | None = None) -> Started:
    """``infer_start`` on the event loop (``pipeline.intake``): one Lua script for the
    deduplication claim, the rate limit, admission and the status, then the task's
    message pushed onto the broker. Where that path does not apply (another broker,
    Celery's publish traced) or Redis is down, ``infer_start`` runs in a thread, with
    its fallbacks. Shielded: a client that leaves meanwhile cannot stop a request
    half-way between admitted and queued."""
    intake = await _intake()
    if not intake.publishes or not shared_state.available():
        return await sync_to_async(infer_start, thread_sensitive=False)(request=request, rates=rates)
    starting = asyncio.ensure_future(_intake_start(intake, request, rates or TenantRates()))
    # A client that left is not told how its start ended (a refusal, say): read it here,
    # or asyncio would log it as an exception nobody retrieved.
    starting.add_done_callback(lambda task: task.cancelled() or task.exception())
    return await asyncio.shield(starting)


async def _intake_start(intake: Intake, request: PromptRequest, rates: TenantRates) -> Started:
    config = get_config()
    key = dedup_key(request) if config.dedup.enabled else None
    max_global, max_per_tenant, lease_s = admission_bounds(config)
    limits = IntakeLimits(config.dedup.window_s, rates.requests_per_minute, rates.tokens_per_minute, max_global, max_per_tenant, lease_s)
    try:
        outcome = await intake.start(get_bus(), request, dedup_key=key, limits=limits, now=time.time(), argsrepr=realtime_argsrepr(request))
    except ServiceUnavailable as exc:
        shared_state.failed("start the request", exc.__cause__ or exc)
        return await sync_to_async(infer_start, thread_sensitive=False)(request=request, rates=rates)
    shared_state.succeeded()
    if key is not None:
        answered = _deduplicated(outcome.kind, outcome.value, key)
        if answered is not None:
            return answered
    if outcome.kind == "rate":
        raise _rate_limited(outcome.value, outcome.retry_after_s, rates)
    if outcome.kind == "shed":
        raise _shed(outcome.value, max_global=max_global, max_per_tenant=max_per_tenant)
    if outcome.pushed:
        return Started("submitted", request.request_id)
    try:
        await intake.publish(request, realtime_argsrepr(request))
    except redis.RedisError as exc:
        _broker_unavailable(request, exc)
        return Started("inline", request.request_id)
    return Started("submitted", request.request_id)


_intake_built: Intake | None = None


def intake_prepare() -> Intake:
    """This process's ``Intake``, built now if it is not yet: Celery publishes its template
    message meanwhile. The gateway calls it at start (``orchestrator_site.asgi``)."""
    global _intake_built
    if _intake_built is None:
        _intake_built = _build_intake()
    return _intake_built


async def _intake() -> Intake:
    return _intake_built or await sync_to_async(intake_prepare, thread_sensitive=False)()


def _build_intake() -> Intake:
    from orchestrator_site.celery import app

    messages = TaskMessages.from_celery(realtime_enqueue, Queue.REALTIME.value)
    return Intake(BrokerQueue.for_broker(str(app.conf.broker_url or ""), app.conf.broker_transport_options or {}, messages))


def _deduplicated(kind: str, value: str, key: str) -> Started | None:
    """A deduplication claim's outcome: the answer it found (from the window, or the
    stream of the identical request in flight), or None (the claim is this request's)."""
    hit = kind in ("done", "inflight")
    metrics.child(metrics.DEDUP_REQUESTS, "hit" if hit else "miss").inc()
    telemetry.annotate(dedup_key=key, cache_hit=hit)
    if kind == "done":
        result = PipelineResult.from_dict(json.loads(value))
        return Started("cached", result.request_id, result)
    if kind == "inflight":
        return Started("attached", value)
    return None


def _rate_limited(kind: str, retry_after_s: float, rates: TenantRates) -> RateLimited:
    metrics.child(metrics.RATE_LIMITED, kind).inc()
    limit = getattr(rates, kind)  # the verdict's kind names the limit's field
    return RateLimited(
        f"rate limit reached: {limit} {kind.replace('_', ' ')}",
        data={"limit": limit, "kind": kind, "window_s": int(RATE_WINDOW_S)},
        retry_after=retry_after_s,
    )


def _shed(scope: str, *, max_global: int, max_per_tenant: int) -> Overloaded:
    metrics.child(metrics.REQUESTS_SHED, scope).inc()
    limit = max_per_tenant if scope == "tenant" else max_global
    # Shed at once rather than queue without bound: the client retries, nothing waits here.
    return Overloaded(f"the {scope} real-time queue is full ({limit} requests in flight)", data={"scope": scope, "limit": limit}, retry_after=1.0)


def _broker_unavailable(request: PromptRequest, exc: BaseException) -> None:
    # The broker (often the same Redis) is unavailable: an accepted request is not
    # dropped, this process runs it.
    log.warning("broker_unavailable", request_id=request.request_id, outcome="degraded", error_type=type(exc).__name__)


def rate_limiter() -> RateLimiter:
    return cast(RateLimiter, WithFallback(_shared_limiter(), _local_limiter))


def _shared_limiter() -> RateLimiter:
    return RateLimiter(get_bus().client, prefix=get_bus().prefix)


def tenant_rates(tenant: Tenant, config: PipelineSettings | None = None) -> TenantRates:
    """The tenant's own limits, or the configured defaults where it has none."""
    defaults = (config or get_config()).rate_limits
    return TenantRates(
        requests_per_minute=defaults.requests_per_minute if tenant.requests_per_minute is None else tenant.requests_per_minute,
        tokens_per_minute=defaults.tokens_per_minute if tenant.tokens_per_minute is None else tenant.tokens_per_minute,
    )


def infer_submit(*, request: PromptRequest, rates: TenantRates | None = None) -> bool:
    """Rate-limit, admit (or shed), record as queued, put one task on ``realtime``.
    False when Redis is down: no worker's answer could reach the gateway, so the
    request is to run here (``infer_inline``)."""
    rates = rates or TenantRates()
    limiter = rate_limiter()
    allowed = limiter.check(request.tenant_id, request.request_id, rates)
    if not allowed.allowed:
        raise _rate_limited(allowed.kind, allowed.retry_after_s, rates)
    gate = admission()
    verdict = gate.acquire(request.tenant_id, request.request_id)
    if not verdict.admitted:
        limiter.forget(request.tenant_id, request.request_id)  # shed by us: not the tenant's to pay for
        raise _shed(verdict.scope, max_global=gate.max_global, max_per_tenant=gate.max_per_tenant)
    if not shared_state.available():
        return False
    bus = get_bus()
    try:
        bus.set_status(request.request_id, tenant_id=request.tenant_id, session_id=request.session_id, status="queued", created_at=f"{time.time():.6f}")
    except ServiceUnavailable as exc:
        shared_state.failed("record the request status", exc.__cause__ or exc)
        return False
    try:
        realtime_enqueue(request)
    except KombuOperationalError as exc:
        _broker_unavailable(request, exc)
        return False
    return True


def realtime_argsrepr(request: PromptRequest) -> str:
    """The task's argument repr (in the message's headers, Flower and the worker's log)."""
    return f"(<request {request.request_id}>,)"


def realtime_enqueue(request: PromptRequest, *, connection: Any = None) -> None:
    """Put the request's task on ``realtime`` (on ``connection``'s broker if given).
    The message's argument repr (in its headers, Flower and the worker's log) names
    the request, never the prompt; the body carries the prompt."""
    from pipeline.tasks import run_realtime

    run_realtime.apply_async(  # type: ignore[call-arg]  # the stubs lack argsrepr and kwargsrepr
        args=(request.to_dict(),), retry=False, connection=connection, argsrepr=realtime_argsrepr(request), kwargsrepr="{}"
    )


async def infer_wait(*, request: PromptRequest, timeout_s: float) -> PipelineResult:
    """The result, read from the request's token stream (never a Celery result backend).
    If Redis goes away meanwhile, the request is run here instead: an accepted
    request is answered (its worker's answer, if any, had nowhere to go)."""
    async with contextlib.aclosing(get_bus().events(request.request_id, timeout_s=timeout_s)) as events:
        while True:
            try:
                event = await anext(events)
            except StopAsyncIteration:
                break
            except ServiceUnavailable as exc:
                shared_state.failed("wait for the result", exc.__cause__ or exc)
                return await sync_to_async(infer_inline, thread_sensitive=False)(request=request)
            if event.type == "done":
                return PipelineResult.from_dict(event.data)
            if event.type == "error":
                raise OrchestratorError.from_dict(event.data)
    raise RequestTimeout(f"no result within {timeout_s:g}s; poll GET /api/v1/status/{request.request_id}", data={"request_id": request.request_id})


def infer_inline(*, request: PromptRequest) -> PipelineResult:
    """Run the request in this (gateway) process, and return the answer instead of
    publishing it. Used while Redis is down (neither the queue nor the token bus
    could carry it; limits, breaker and deduplication work on this process's own
    state, ``resilience.local``), and while the broker is."""
    config = get_config()
    key = dedup_key(request) if config.dedup.enabled else None
    clock = metrics.StreamClock(request.worker, accepted_at=time.time())
    log.warning("request_run_inline", request_id=request.request_id, session_id=request.session_id, outcome="degraded", reason="redis unavailable")
    try:
        result = _execute(request, config, clock, on_bus=False)
    except OrchestratorError as exc:
        clock.finished(exc.code)
        if key:
            dedup_store(config).abandon(key, request.request_id)
        _record_inline(request, "error", exc.to_dict())
        raise
    finally:
        _release_slot(request)
        # An executor thread of the gateway, not a request thread: Django would never
        # hand its connection back to the pool.
        close_old_connections()
    clock.finished("ok")
    if key:
        dedup_store(config).complete(key, json.dumps(result.to_dict()))
    rate_limiter().record_tokens(request.tenant_id, request.request_id, result.usage.total_tokens)
    _record_inline(request, "done", result.to_dict())
    return result


def _record_inline(request: PromptRequest, event: str, data: dict[str, Any]) -> None:
    """Where Redis is up (only the broker was down), the status and result endpoints
    see the inline answer too; where it is down, nobody can poll anyway."""
    if not shared_state.available():
        return
    try:
        get_bus().publish(request.request_id, event, data)
        get_bus().set_status(request.request_id, status="completed" if event == "done" else "failed", executed_by=f"{socket.gethostname()}:{os.getpid()}")
    except ServiceUnavailable as exc:
        shared_state.failed("record the inline answer", exc.__cause__ or exc)


def realtime_execute(payload: Mapping[str, Any]) -> None:
    """Run one request through the five stages. The task boundary: nothing escapes."""
    request = _parse_payload(payload)
    if request is None:
        # Not one of ours (or from an incompatible version): nothing to answer to.
        log.error("task_payload_invalid", outcome="dropped", payload_type=type(payload).__name__)
        return
    released = False
    try:
        released = _run_and_answer(request)
    except ServiceUnavailable:
        # Redis is gone, so nobody can be told: the gateway answers with its timeout.
        log.warning("task_unanswered", request_id=request.request_id, outcome="degraded", reason="redis unavailable")
    except Exception as exc:  # task boundary: even answering failed; logged, never raised into Celery
        log.exception("task_unanswered", request_id=request.request_id, outcome="error", error_type=type(exc).__name__)
    finally:
        if released:
            _local_admission.release(request.tenant_id, request.request_id)  # as WithFallback releases both
        else:
            _release_slot(request)


class ReadAhead:
    """A real-time task's reads from Postgres, run before their stages: beside the
    task's start script (``script_beside``), so that the Postgres and Redis round
    trips overlap. The RAG search and, in the same round trip, the session's stored
    turns when the assemble stage will want them (the request names a session and
    sends no conversation of its own). Each stage gets its outcome, a result or the
    database error the search raised, when it asks with the same arguments, once;
    anything else is read when asked. The round trip's time is reported as the rag
    stage's (``timings_us["rag"]``, the stage metrics): the history read with the
    search costs no round trip of its own.

    A tenant this process knows to have no documents (``pipeline.presence``) is not
    searched: beside the start only its turns are read, if wanted, and the start's
    reading of the tenant's document generation (``started``) decides: the same as
    when the tenant was seen empty, and the stage gets an empty result; another, and
    the stage searches. Otherwise the search also asks whether the tenant has any
    document, when this process had read a generation before sending it."""

    def __init__(self, request: PromptRequest, config: PipelineSettings, known: presence.EmptyTenants | None = None) -> None:
        self._request = request
        self._args = search_args(request, config.rag)
        self._turns = config.assemble.history_turns
        self._with_history = request.names_session and not request.history and self._turns > 0
        self._outcome: RetrievalResult | DatabaseError | None = None
        self._history: tuple[ChatMessage, ...] | None = None
        self._known = known or presence.empty_tenants
        self._empty_at = self._known.empty_at(request.tenant_id)  # None: search
        self._read_before: str | None = None  # the generation read before the search was sent
        self._has_documents: bool | None = None

    def generation(self, bus: TokenBus) -> tuple[str, str]:
        """For the start script: the tenant's generation key, and a value to create it with."""
        return presence.generation_key(bus, self._request.tenant_id), presence.new_generation()

    def run(self) -> None:
        if self._empty_at is not None:
            self._read_turns_alone()
            return
        self._read_before = self._known.latest(self._request.tenant_id)
        started = time.perf_counter_ns()
        try:
            read = selectors.document_search_ahead(
                **self._args,
                session_id=self._request.session_id if self._with_history else None,
                turns=self._turns,
                presence=self._read_before is not None,
            )
        except DatabaseError as exc:
            self._outcome = exc  # raised in the stage, where the search would have raised it
            return
        self._outcome = dataclasses.replace(read.result, searched_ahead_ns=time.perf_counter_ns() - started)  # the stage's time too
        self._history, self._has_documents = read.history, read.has_documents

    def _read_turns_alone(self) -> None:
        if not self._with_history:
            return
        with contextlib.suppress(DatabaseError):  # assemble reads them itself, and fails there
            self._history = session_history_for(self._request, turns=self._turns)

    def started(self, generation: str | None) -> None:
        """The task's start read the tenant's document ``generation`` (None: it read none)."""
        tenant = self._request.tenant_id
        if generation is not None:
            self._known.read(tenant, generation)
        if self._empty_at is not None:
            if generation == self._empty_at:
                self._outcome = RetrievalResult(documents=())  # still none: nothing to search
            else:
                self._known.forget(tenant)  # documents were added (or it is unknown): the stage searches
        elif self._has_documents is False and self._read_before is not None:
            self._known.learned(tenant, self._read_before)

    def __call__(self, **args: Any) -> RetrievalResult:
        """The rag stage's retriever."""
        outcome, self._outcome = self._outcome, None
        if outcome is None or args != self._args:
            return selectors.document_search(**args)
        if isinstance(outcome, DatabaseError):
            raise outcome
        return outcome

    def load_history(self) -> tuple[ChatMessage, ...]:
        """The assemble stage's: the turns read with the search, or read now (none were:
        the request wants none, its search failed or timed out, or they were handed out)."""
        history, self._history = self._history, None
        return session_history_for(self._request, turns=self._turns) if history is None else history


def _run_and_answer(request: PromptRequest) -> bool:
    """Run the request and answer it: True when its slot was released with the answer."""
    config = get_config()
    ahead = ReadAhead(request, config) if config.rag.enabled else None
    started = _start(request, config, ahead=ahead)
    if started is None:
        log.info("task_stale", request_id=request.request_id, outcome="dropped")  # redelivered after it finished
        return False
    created_at, permission = started
    # Computed before any fallback re-routing: the key is the client's request.
    key = dedup_key(request) if config.dedup.enabled else None
    telemetry.annotate(request_id=request.request_id, dedup_key=key, cache_hit=False)
    clock = metrics.StreamClock(request.worker, accepted_at=metrics.parse_time(created_at or None))
    answered = released = False
    try:
        result = _execute(request, config, clock, permission=permission, ahead=ahead)
    except ServiceUnavailable:
        raise  # the answer cannot be delivered either; realtime_execute logs it
    except OrchestratorError as exc:
        _record_failure(request, exc, clock)
    except SoftTimeLimitExceeded:
        _record_failure(request, RequestTimeout("the request hit the task time limit"), clock)
    except Exception as exc:  # pipeline boundary: logged with its traceback, answered as internal_error
        log.exception("task_crashed", request_id=request.request_id, outcome="error", error_type=type(exc).__name__)
        _record_failure(request, OrchestratorError("internal error while running the pipeline"), clock)
    else:
        released = _answer(request, result, key, config)
        clock.finished("ok")
        answered = True
    finally:
        if key and not answered:
            dedup_store(config).abandon(key, request.request_id)  # errors are not served to others
    return released


def _answer(request: PromptRequest, result: PipelineResult, key: str | None, config: PipelineSettings) -> bool:
    """The ``done`` event and final status, then the request's bookkeeping: its answer
    into the deduplication window, its tokens into the tenant's rate log, its slot
    released. With Redis in use, all of it is one pipeline after the event (one round
    trip, not four; True: the slot is released). While Redis is marked down, the
    bookkeeping goes through each store's fallback, as the stores do on their own."""
    bus, body = get_bus(), result.to_dict()
    tokens = result.usage.total_tokens
    if not shared_state.available():
        bus.finish(request.request_id, "done", body, status="completed")
        if key:
            dedup_store(config).complete(key, json.dumps(body))
        rate_limiter().record_tokens(request.tenant_id, request.request_id, tokens)
        return False
    then: list[Callable[[Any], None]] = [
        functools.partial(_shared_limiter().queue_record_tokens, tenant_id=request.tenant_id, request_id=request.request_id, tokens=tokens),
        functools.partial(_shared_admission(config).queue_release, tenant_id=request.tenant_id, request_id=request.request_id),
    ]
    if key:
        then.insert(0, functools.partial(_shared_dedup(config).queue_complete, key=key, result_json=json.dumps(body)))
    bus.finish(request.request_id, "done", body, status="completed", then=then)
    return True


def _start(request: PromptRequest, config: PipelineSettings, *, ahead: ReadAhead | None = None) -> tuple[str, Permission | None] | None:
    """The request marked running and its worker's breaker asked, in one round trip:
    None when it has already finished (a redelivered task). A worker this process does
    not know has no breaker to ask: the pipeline answers for it. ``ahead`` runs while
    Redis answers, and is told the tenant's document generation the script read (for a
    known worker; otherwise it is not run, and its stages read for themselves)."""
    # Which worker process ran it: for operators, and the proof that no eager mode is involved.
    executed_by = f"{socket.gethostname()}:{os.getpid()}"
    if request.worker not in config.workers:
        created_at = get_bus().begin(request.request_id, executed_by=executed_by)
        return None if created_at is None else (created_at, None)
    bus = get_bus()
    breaker = _shared_breaker(config, request.worker)
    beside, to_read = (ahead.run, ahead.generation(bus)) if ahead is not None else (None, None)
    started = breaker.begin_and_allow(bus, request.request_id, executed_by=executed_by, beside=beside, generation=to_read)
    if started is None:
        return None
    created_at, permission, generation = started
    if ahead is not None:
        ahead.started(generation)
    return created_at, permission


def _release_slot(request: PromptRequest) -> None:
    # With Redis down, released from this process's count; the shared slot's lease
    # expires on its own.
    admission().release(request.tenant_id, request.request_id)


def _parse_payload(payload: object) -> PromptRequest | None:
    if not isinstance(payload, Mapping):
        return None
    try:
        return PromptRequest.from_dict(payload)
    except (KeyError, TypeError, ValueError):
        return None


def _shared_breaker(config: PipelineSettings, worker: str) -> CircuitBreaker:
    # A worker unknown here was routed on a config this process does not have (a
    # rollout): UnknownWorker, answered as the gateway would.
    settings = worker_config(config, worker).breaker
    policy = BreakerPolicy(failure_threshold=settings.failure_threshold, open_s=settings.open_s, half_open_trials=settings.half_open_trials)
    return CircuitBreaker(get_bus().client, prefix=get_bus().prefix, worker=worker, policy=policy)


def breaker_for(config: PipelineSettings, worker: str) -> CircuitBreaker:
    shared = _shared_breaker(config, worker)
    return cast(CircuitBreaker, WithFallback(shared, LocalBreaker(worker=worker, policy=shared.policy)))


def _route_around_open_circuits(request: PromptRequest, config: PipelineSettings, permission: Permission | None = None) -> PromptRequest:
    """The request as it will run: on its worker, on the fallback while the worker's
    circuit is open, or not at all (CircuitOpen: fail fast, no upstream call).
    ``permission``: the worker's breaker already asked (a real-time task's start)."""
    permission = permission or breaker_for(config, request.worker).allow()
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


def run_guarded(
    request: PromptRequest, config: PipelineSettings, run: Callable[[PromptRequest], PipelineResult], *, permission: Permission | None = None
) -> PipelineResult:
    """``run`` the request behind its worker's circuit breaker: on the fallback (or
    refused) while the circuit is open, and the outcome recorded. Real-time requests
    (``permission``: their start asked the breaker) and batch items both go through here."""
    request = _route_around_open_circuits(request, config, permission)
    breaker = breaker_for(config, request.worker)
    try:
        result = run(request)
    except TransientWorkerError:
        breaker.record(success=False)
        raise
    except PermanentWorkerError:
        breaker.record(success=True)  # the provider is up: it answered, if only to refuse
        raise
    breaker.record(success=True)
    return result


def _execute(
    request: PromptRequest,
    config: PipelineSettings,
    clock: metrics.StreamClock,
    *,
    on_bus: bool = True,
    permission: Permission | None = None,
    ahead: ReadAhead | None = None,
) -> PipelineResult:
    def run(routed: PromptRequest) -> PipelineResult:
        clock.worker = routed.worker
        return _run_stages(routed, config, clock, on_bus=on_bus, ahead=ahead)

    return run_guarded(request, config, run, permission=permission)


def _run_stages(
    request: PromptRequest, config: PipelineSettings, clock: metrics.StreamClock, *, on_bus: bool = True, ahead: ReadAhead | None = None
) -> PipelineResult:
    bus = get_bus()

    def publish(chunk: TokenChunk) -> None:
        if on_bus and not bus.publish_token(request.request_id, {"seq": clock.tokens, "text": chunk.text}):
            raise RequestCancelled(data={"after_tokens": clock.tokens})  # every reader left: stop the upstream call
        clock.token()

    deps = PipelineDeps(
        config=config,
        retrieve=ahead or selectors.document_search,
        load_history=ahead.load_history if ahead else lambda: session_history_for(request, turns=config.assemble.history_turns),
        worker=worker_pool.get(config, request.worker),
        publish=publish,
        streaming=True,
        still_wanted=(lambda: bus.wanted(request.request_id)) if on_bus else None,
    )
    _ctx, result = run_pipeline(request, deps, clock.stages)
    session_turns_append(request=request, reply=result.text)
    return result


def session_history_for(request: PromptRequest, *, turns: int) -> tuple[ChatMessage, ...]:
    """The session's stored turns. A request that named no session has a new one (its
    own request id, which no client could know before): nothing to read."""
    if not request.names_session:
        return ()
    return selectors.session_history(tenant_id=request.tenant_id, session_id=request.session_id, turns=turns)


def _record_failure(request: PromptRequest, error: OrchestratorError, clock: metrics.StreamClock | None = None) -> None:
    bus = get_bus()
    outcome = "cancelled" if isinstance(error, RequestCancelled) else "error"
    log.warning("request_failed", request_id=request.request_id, session_id=request.session_id, outcome=outcome, error_code=error.code)
    bus.finish(request.request_id, "error", error.to_dict(), status="failed")
    if clock:
        clock.finished(error.code)


_TURNS_SQL = f"""
INSERT INTO {SessionTurn._meta.db_table} (tenant_id, session_id, request_id, role, content, created_at)
VALUES (%(tenant)s, %(session)s, %(request)s, 'user', %(prompt)s, now()),
       (%(tenant)s, %(session)s, %(request)s, 'assistant', %(reply)s, now())
"""


def session_turns_append(*, request: PromptRequest, reply: str) -> None:
    """The prompt and its reply, as two turns of the session: one INSERT, so both or
    neither, in one round trip (``bulk_create`` wraps its INSERT in BEGIN and COMMIT)."""
    with connection.cursor() as cursor:
        cursor.execute(
            _TURNS_SQL, {"tenant": request.tenant_id, "session": request.session_id, "request": request.request_id, "prompt": request.prompt, "reply": reply}
        )


def document_create(*, tenant: Tenant, title: str, body: str, metadata: Mapping[str, Any] | None = None) -> Document:
    return Document.objects.create(tenant=tenant, title=title, body=body, metadata=dict(metadata or {}))


def document_delete(*, tenant_id: str, document_id: str) -> None:
    selectors.document_get_for_tenant(tenant_id=tenant_id, document_id=document_id).delete()


def request_status_get(*, tenant_id: str, request_id: str) -> dict[str, Any]:
    """The status hash of one of the tenant's requests; another tenant's is not found."""
    status = get_bus().get_status(request_id)
    if not status or status.get("tenant_id") != tenant_id:
        raise _request_not_found(request_id)
    return status


def request_result_get(*, tenant_id: str, request_id: str) -> tuple[str, PipelineResult | None]:
    """The status, with the result when completed (None while pending); the recorded
    error when it failed."""
    status = request_status_get(tenant_id=tenant_id, request_id=request_id).get("status", "queued")
    if status not in ("completed", "failed"):
        return status, None
    for event in reversed(get_bus().read_all(request_id)):
        if event.type == "done":
            return status, PipelineResult.from_dict(event.data)
        if event.type == "error":
            raise OrchestratorError.from_dict(event.data)
    raise _request_not_found(request_id)  # the stream expired before the status hash


def _request_not_found(request_id: str) -> NotFound:
    return NotFound("request not found", data={"request_id": request_id})
