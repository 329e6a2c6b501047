"""A run of a real-time request, in a worker (or, while the broker is down, in the
gateway): begin the attempt, run the five stages, settle the answer.

1. ``fencing.begin`` makes this run the owner of the request's attempt, or says
   why not (already answered, a later attempt published, another run began it):
   a stale message is dropped, as Zulip's workers drop stale events.
2. The run holds the request's lease (``services.leases``) until it settles.
3. The stages run under the request's deadline (``limits.request_timeout_s`` from
   its acceptance, carried in its record): past it, the provider call is cancelled
   and the request fails with ``worker_timeout``.
4. A request under a budget has its reservation corrected to the assembled
   prompt before the provider is called (``services.budgets``), and is refused
   with ``budget_exceeded`` when that does not fit.
5. The answer is settled once: the session's turns (by attempt), then the
   terminal event and status under fencing, then the bookkeeping (the answer
   into the deduplication window, its tokens into the tenant's rate log, its cost
   into its budgets, the admission slot released) and its row of the usage
   ledger. A run fenced out meanwhile stops without a word: another run answers.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import structlog
from django.db import close_old_connections

from orchestrator_site import telemetry
from orchestrator_site.errors import OrchestratorError, RequestCancelled, ServiceUnavailable, WorkerRateLimited
from pipeline import metrics, selectors
from pipeline.config import PipelineSettings, config_at, get_config
from pipeline.engine import PipelineDeps, run_pipeline
from pipeline.resilience.dedup import dedup_key
from pipeline.resilience.local import shared_state
from pipeline.routing import worker_pool
from pipeline.services import budgets, failover, gates, leases, routes, sessions
from pipeline.shared_redis import redis_errors
from pipeline.stages.stream import Publisher
from pipeline.tokenbus import RequestStatus, TokenBus, fencing, get_bus
from pipeline.tokenbus.fencing import BeginOutcome, Begun, Run
from pipeline.tokenbus.producer import Fenced, Producer
from pipeline.types import DedupMode, PipelineResult, PromptRequest, TokenChunk
from workers.types import AssembledPrompt

log = structlog.get_logger("pipeline.services")

WANTED_EVERY_S = 0.25  # how often a run of a whole answer asks whether anyone still waits


def executed_by() -> str:
    """Which process ran it: for operators, and the proof that no eager mode is involved."""
    return f"{socket.gethostname()}:{os.getpid()}"


def realtime_execute(request_id: object, attempt: object) -> None:
    """Run one attempt of a request. The task boundary: nothing escapes."""
    if not isinstance(request_id, str) or not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        # Not one of ours (or from an incompatible version): nothing to answer to.
        log.error("task_payload_invalid", outcome="dropped", request_id_type=type(request_id).__name__, attempt_type=type(attempt).__name__)
        return
    leases.keeper.release(Run(request_id, attempt))  # the message's hold, while it waited for a thread
    try:
        _run(Run.new(request_id, attempt))
    except ServiceUnavailable:
        # Redis is gone, so nobody can be told; the lease sweep decides the request once it is back.
        log.warning("task_unanswered", request_id=request_id, attempt=attempt, outcome="degraded", reason="redis unavailable")
    except Exception as exc:  # task boundary: even answering failed; logged, never raised into Celery
        log.exception("task_unanswered", request_id=request_id, attempt=attempt, outcome="error", error_type=type(exc).__name__)


def realtime_execute_here(request_id: str) -> None:
    """The gateway's own run of attempt 1 (the broker is down), in an executor thread."""
    try:
        realtime_execute(request_id, 1)
    finally:
        # An executor thread of the gateway, not a request thread: Django would never
        # hand its connection back to the pool.
        close_old_connections()


def _run(run: Run) -> None:
    config, bus = get_config(), get_bus()
    begun = fencing.begin(bus, run, lease_s=config.limits.run_lease_s, executed_by=executed_by())
    if begun.outcome is not BeginOutcome.RUN:
        log.info("task_stale", request_id=run.request_id, attempt=run.attempt, outcome="dropped", reason=begun.outcome.value)
        return
    leases.keeper.hold(run)
    try:
        _answer(run, begun, config, bus)
    finally:
        leases.keeper.release(run)


def _answer(run: Run, begun: Begun, config: PipelineSettings, bus: TokenBus) -> None:
    producer = Producer(bus, run)
    try:
        request = PromptRequest.from_dict(begun.payload or {})
    except (KeyError, TypeError, ValueError):
        # Written by an incompatible version: nothing this run can do but say so.
        log.error(  # noqa: TRY400  (the record is the problem, not a traceback)
            "task_payload_invalid", request_id=run.request_id, outcome="dropped"
        )
        producer.finish("error", OrchestratorError("the request's record is unreadable").to_dict(), status=RequestStatus.FAILED)
        return
    config = config_at(request.config_version)  # the version it started on, to its end
    key = dedup_key(request) if config.dedup.enabled and request.dedup is not DedupMode.OFF else None
    telemetry.annotate(request_id=request.request_id, attempt=run.attempt, dedup_key=key, cache_hit=False)
    clock = metrics.StreamClock(request.worker, accepted_at=begun.created_at)
    deadline_at = begun.deadline_at or time.time() + config.limits.request_timeout_s

    def stages(routed: PromptRequest) -> PipelineResult:
        budget_key = bus.record_key(routed.request_id) if begun.reserved_nano else None
        correct = _budget_correction(routed, config, budget_key) if budget_key else None
        return _run_stages(routed, config, clock, producer, deadline_at, before_inference=correct, budget_key=budget_key)

    try:
        result = gates.run_guarded(request, config, stages)
    except Fenced:
        log.info("run_fenced", request_id=request.request_id, attempt=run.attempt, outcome="dropped")
    except OrchestratorError as exc:
        _settle_failure(producer, request, exc, clock, key, config)
    except Exception as exc:  # pipeline boundary: logged with its traceback, answered as internal_error
        log.exception("task_crashed", request_id=request.request_id, outcome="error", error_type=type(exc).__name__)
        _settle_failure(producer, request, OrchestratorError("internal error while running the pipeline"), clock, key, config)
    else:
        _settle_success(producer, request, result, clock, key, config, budgeted=bool(begun.reserved_nano))


def _budget_correction(request: PromptRequest, config: PipelineSettings, record_key: str) -> Callable[[AssembledPrompt], None]:
    def correct(prompt: AssembledPrompt) -> None:
        budgets.correct(request, prompt, config, record_key=record_key)

    return correct


def run_stages(
    request: PromptRequest,
    config: PipelineSettings,
    clock: metrics.StreamClock,
    *,
    publish: Publisher,
    deadline_at: float,
    still_wanted: Callable[[], bool] | None = None,
    before_inference: Callable[[AssembledPrompt], None] | None = None,
    budget_key: str | None = None,
) -> PipelineResult:
    """The five stages of ``request`` (routed: the worker it runs on), streaming from its
    worker, and going on on a fallback if it fails mid-stream (``budget_key``: the
    reservation a failover must fit, when a budget applies)."""
    clock.worker = request.worker
    deps = PipelineDeps(
        config=config,
        retrieve=selectors.document_search,
        load_history=lambda: sessions.session_history_for(request, turns=config.assemble.history_turns),
        worker=worker_pool.get(config, request.worker),
        publish=publish,
        streaming=True,
        still_wanted=still_wanted,
        deadline_at=deadline_at,
        before_inference=before_inference,
        failover=failover.planner(request, config, budget_key=budget_key),
    )
    _ctx, result = run_pipeline(request, deps, clock.stages)
    return result


def _run_stages(
    request: PromptRequest,
    config: PipelineSettings,
    clock: metrics.StreamClock,
    producer: Producer,
    deadline_at: float,
    *,
    before_inference: Callable[[AssembledPrompt], None] | None = None,
    budget_key: str | None = None,
) -> PipelineResult:
    def publish(chunk: TokenChunk) -> None:
        extras: dict[str, Any] = {"tool_calls": list(chunk.tool_calls)} if chunk.tool_calls else {}
        if chunk.logprobs:
            extras["logprobs"] = list(chunk.logprobs)
        if chunk.failover:
            extras["failover"] = dict(chunk.failover)
        if not producer.publish_token(clock.tokens, chunk.text, extras):
            raise RequestCancelled(data={"after_tokens": clock.tokens + 1})  # every reader left: stop the upstream call
        clock.token()

    publish_or_count = publish if request.stream else _counting(producer, clock)
    return run_stages(
        request,
        config,
        clock,
        publish=publish_or_count,
        deadline_at=deadline_at,
        still_wanted=producer.wanted,
        before_inference=before_inference,
        budget_key=budget_key,
    )


def _counting(producer: Producer, clock: metrics.StreamClock) -> Publisher:
    """For a client that waits for the whole answer: the tokens are counted, not
    published (the done event carries the text: one write, one wake-up of the reader,
    not one per burst), and whether anyone still waits is asked every ``WANTED_EVERY_S``
    of a busy stream (a silent one is asked by the streamed stage)."""
    asked = [time.monotonic()]

    def count(chunk: TokenChunk) -> None:
        clock.token()
        if time.monotonic() - asked[0] >= WANTED_EVERY_S:
            asked[0] = time.monotonic()
            if not producer.wanted():
                raise RequestCancelled(data={"after_tokens": clock.tokens})

    return count


def _settle_success(
    producer: Producer,
    request: PromptRequest,
    result: PipelineResult,
    clock: metrics.StreamClock,
    key: str | None,
    config: PipelineSettings,
    *,
    budgeted: bool = False,
) -> None:
    cost = budgets.actual_nano(result, config)
    usage = budgets.ledger_row(result, cost_nano=cost)
    sessions.session_turns_append(request=request, reply=result.text, attempt=producer.run.attempt, usage=usage)
    body = result.to_dict()
    if not producer.finish("done", body, status=RequestStatus.COMPLETED):
        log.info("run_fenced", request_id=request.request_id, attempt=producer.run.attempt, outcome="dropped")
        return
    clock.finished("ok")
    budgets.count_spend(request.tenant_id, result, config)
    _bookkeeping(
        request,
        config,
        key=key,
        result_json=json.dumps(body),
        tokens=result.usage.total_tokens,
        charge_nano=cost if budgeted else None,
        # The first token's worker: the first leg's, when the answer failed over.
        ttft=((result.legs[0] if result.legs else result).worker, clock.ttft_s) if clock.ttft_s is not None else None,
    )


def _bookkeeping(
    request: PromptRequest,
    config: PipelineSettings,
    *,
    key: str | None,
    result_json: str,
    tokens: int,
    charge_nano: int | None = None,
    ttft: tuple[str, float] | None = None,
) -> None:
    """The answer into the deduplication window, its tokens into the tenant's rate log,
    its cost into its budgets (``charge_nano``; None: none applies), its slot released:
    one round trip, after the client has its answer."""
    gates.local_admission(config).release(request.tenant_id, request.request_id)  # a slot taken while Redis was down
    client = get_bus().redis.client
    try:
        with redis_errors("settle the request"):
            pipe: Any = client.pipeline(transaction=False)
            if key and request.dedup is DedupMode.FULL:
                gates.shared_dedup(config).queue_complete(pipe, key, result_json)
            elif key:
                gates.shared_dedup(config).queue_release(pipe, key)  # a sampled answer: joined in flight, never served again
            gates.shared_limiter().queue_record_tokens(pipe, request.tenant_id, request.request_id, tokens)
            gates.shared_admission(config).queue_release(pipe, request.tenant_id, request.request_id)
            if charge_nano is not None:
                budgets.queue_settle(pipe, get_bus().record_key(request.request_id), charge_nano)
            if ttft is not None:  # the route groups' latency window (services.routes)
                routes.queue_ttft(pipe, get_bus().prefix, *ttft)
            pipe.execute()
    except ServiceUnavailable as exc:
        # The slot's lease frees it; the tokens go uncounted; the answer is not served
        # again; the budgets keep the reservation (never less than the cost) until
        # their period's key expires.
        shared_state.failed("settle the request", exc.__cause__ or exc)


def _settle_failure(
    producer: Producer, request: PromptRequest, error: OrchestratorError, clock: metrics.StreamClock, key: str | None, config: PipelineSettings
) -> None:
    if isinstance(error, WorkerRateLimited):  # its route groups pass it over until Retry-After
        routes.provider_limiting(request.worker, error.retry_after)
    outcome = "cancelled" if isinstance(error, RequestCancelled) else "error"
    log.warning("request_failed", request_id=request.request_id, session_id=request.session_id, outcome=outcome, error_code=error.code)
    if not producer.finish("error", error.to_dict(), status=RequestStatus.FAILED):
        return
    clock.finished(error.code)
    leases.release_gates(request.request_id, request.tenant_id, key or "", config)
