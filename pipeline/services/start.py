"""A real-time request's start at the gateway: route, deduplicate, rate-limit,
admit, reserve budget, record, publish.

The first five are one Lua script on the shared Redis, composed of the functions
that ``DedupStore``, ``RateLimiter``, ``Admission`` and the budgets
(``resilience.budget``) run on their own, so a request refused by a limit leaves
no claim, count, slot or reservation behind. The script also writes the
request's record (``tokenbus.bus``: the request itself, its deadline, attempt 1).
It is idempotent by request id: redis-py sends a command again on a new
connection when the reply was lost, and a second run of the script finds the
record and changes nothing, so a lost reply never starts a request twice.

Then Celery's own publish (``apply_async``, from a small pool of threads: kombu's
publish blocks) puts ``run_realtime(request_id, attempt)`` on the ``realtime``
queue, and the request's lease starts (``tokenbus.fencing``), in that pool too,
while the client already reads.

What the gateway does when a service is down, so that an accepted request is
answered and never run twice:

- Redis down: nothing reached the broker, so no worker can hold the request.
  The gateway runs it itself, on this process's own gates (``services.inline``),
  unless a budget applies to it: spend that cannot be counted is refused (503).
- The broker down (Redis up): the message never left, so the gateway runs the
  request itself, through Redis like a worker: it begins attempt 1 and writes
  the token stream under the same fencing, so a message that did reach the
  broker after all finds the attempt taken.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog
from asgiref.sync import sync_to_async
from django.db import close_old_connections
from kombu.exceptions import OperationalError as KombuOperationalError

from orchestrator_site import telemetry
from orchestrator_site.errors import InvalidRequest, ServiceUnavailable, UnsupportedParameter
from pipeline import metrics
from pipeline.config import PipelineSettings, config_version, get_config
from pipeline.resilience import admission, budget, dedup, ratelimit
from pipeline.resilience.dedup import dedup_key
from pipeline.resilience.local import shared_state
from pipeline.resilience.ratelimit import TenantRates
from pipeline.routing import Route, route_request
from pipeline.services import budgets, gates
from pipeline.shared_redis import redis_errors
from pipeline.tokenbus import fencing, get_bus
from pipeline.types import ChatMessage, DedupMode, GenerationOptions, PipelineResult, PromptRequest
from workers.registry import refused

log = structlog.get_logger("pipeline.services")


class StartKind(StrEnum):
    SUBMITTED = "submitted"  # a worker runs it: read its stream
    ATTACHED = "attached"  # an identical request in flight answers it: read that one's stream
    CACHED = "cached"  # answered within the deduplication window: ``Started.result``
    RUN_HERE = "run_here"  # the broker is down: this gateway runs it, on the token bus
    LOCAL = "local"  # Redis is down: this gateway runs it and answers in one piece


@dataclass(frozen=True)
class Started:
    kind: StartKind
    request_id: str  # the request whose stream carries the answer
    result: PipelineResult | None = None

    @property
    def on_the_bus(self) -> bool:
        return self.kind in (StartKind.SUBMITTED, StartKind.ATTACHED, StartKind.RUN_HERE)


def infer_build_request(
    *,
    tenant_id: str,
    data: Mapping[str, Any],
    config: PipelineSettings,
    tenant_has_documents: bool = True,
    stream: bool = True,
    fresh: bool = False,
    api_key_id: int | None = None,
    route: Route | None = None,
) -> PromptRequest:
    """A routed ``PromptRequest`` from validated input. ``stream`` False: its client waits
    for the whole answer (the run then publishes it once, not token by token). ``fresh``
    (``Cache-Control: no-cache``), like ``"dedup": false``, shares no answer."""
    # A route group's choice is made before (``services.routes.aroute``: it reads Redis).
    route = route or route_request(config, worker=data.get("worker"), model=data.get("model"))
    kind = config.workers[route.worker].kind
    seed = data.get("seed")
    options = GenerationOptions.from_dict(data.get("options") or {})
    history = tuple(_message(m) for m in data.get("history") or ())
    tool_turns = tuple(_message(m) for m in data.get("tool_turns") or ())
    refuse_what_the_worker_cannot_honour(route.worker, kind, options=options, seed=seed, messages=history + tool_turns)
    request_id = uuid.uuid4().hex
    return PromptRequest(
        request_id=request_id,
        tenant_id=tenant_id,
        session_id=data.get("session_id") or request_id,
        prompt=data["prompt"],
        worker=route.worker,
        model=route.model,
        max_tokens=max_tokens_for(config, data.get("max_tokens")),
        temperature=data.get("temperature"),
        stop=tuple(data.get("stop") or ()),
        metadata=dict(data.get("metadata") or {}),
        history=history,
        tool_turns=tool_turns,
        tenant_has_documents=tenant_has_documents,
        stream=stream,
        config_version=config_version(),
        dedup=dedup_mode(wanted=bool(data.get("dedup", True)) and not fresh, temperature=data.get("temperature"), kind=kind, seed=seed),
        seed=seed,
        options=options,
        api_key_id=api_key_id,
        route=route.to_dict() if route.group else None,
    )


def _message(message: ChatMessage | tuple[str, str]) -> ChatMessage:
    return message if isinstance(message, ChatMessage) else ChatMessage(*message)


def refuse_what_the_worker_cannot_honour(
    worker: str, kind: str, *, options: GenerationOptions, seed: int | None = None, messages: tuple[ChatMessage, ...] = ()
) -> None:
    """400 ``unsupported_parameter`` naming the optional fields the worker cannot honour
    (its class's ``accepts``); tool calls in the conversation need a worker with tools."""
    asked = set(options.to_dict()) | ({"seed"} if seed is not None else set())
    fields = refused(kind, asked)
    if any(m.is_tool_turn for m in messages) and refused(kind, ["tools"]) and "tools" not in fields:
        fields.append("messages")  # tool calls and results in the conversation
    if fields:
        raise UnsupportedParameter(
            f"worker {worker!r} ({kind}) cannot honour {', '.join(fields)}", data={"field": fields[0], "fields": fields, "worker": worker}
        )


def dedup_mode(*, wanted: bool, temperature: float | None, kind: str, seed: int | None = None) -> DedupMode:
    """A finished answer is served again only where the same request gives the same
    answer: at temperature 0, with a seed, or from echo. A sampled one would repeat
    itself to a user who pressed "regenerate"; identical requests in flight still share
    one run."""
    if not wanted:
        return DedupMode.OFF
    return DedupMode.FULL if kind == "echo" or temperature == 0 or seed is not None else DedupMode.IN_FLIGHT


def max_tokens_for(config: PipelineSettings, requested: int | None) -> int:
    """The request's ``max_tokens``: the configured default when absent, refused above the limit."""
    max_tokens = requested or config.limits.default_max_tokens
    if max_tokens > config.limits.max_tokens_limit:
        raise InvalidRequest(f"max_tokens may be at most {config.limits.max_tokens_limit} (limits.max_tokens_limit)", data={"field": "max_tokens"})
    return max_tokens


# KEYS: 1 dedup in-flight, 2 dedup done, 3 rate requests log, 4 rate tokens log,
#       5 global leases, 6 tenant leases, 7 the request's record, 8 the tenant's budgets.
# ARGV: 1 request_id, 2 dedup window_s (0: none), 3 now, 4 rate window_s, 5 rpm,
#       6 tpm (both 0: no limit, not even counted), 7 slot lease_s, 8 global max,
#       9 tenant max, 10 tenant_id, 11 session_id, 12 record ttl_s, 13 now as recorded,
#       14 the request (JSON), 15 deadline_at, 16 dedup key, 17 serve a finished answer (1/0),
#       18 the key prefix, 19 the API key's id ("": none), 20 the worst case (nano-USD),
#       21 today's id, 22 this month's id.
# Returns {"done", result} | {"inflight", owner} | {"rate", kind, retry_after_ms} |
# {"shed", 0 (global) or -1 (tenant)} | {"budget_unknown"} |
# {"over", budget, scope, remaining, period, limit} | {"queued", request_id}.
START_SCRIPT = (
    dedup.CLAIM_FUNCTION
    + ratelimit.CHECK_FUNCTION
    + admission.ACQUIRE_FUNCTION
    + budget.FUNCTIONS
    + """
local request_id, window_s, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
-- The same start, again: its first reply was lost on the way back.
if redis.call('EXISTS', KEYS[7]) == 1 then return {'queued', request_id} end
if window_s > 0 then
  local claim = dedup_claim(KEYS[1], KEYS[2], request_id, window_s, ARGV[17])
  if claim[1] ~= 'claimed' then return claim end
end
local rpm, tpm = tonumber(ARGV[5]), tonumber(ARGV[6])
local limited = rpm > 0 or tpm > 0
local function abandon()
  if window_s > 0 then redis.call('DEL', KEYS[1]) end
end
if limited then
  local rate = rate_check(KEYS[3], KEYS[4], now, tonumber(ARGV[4]), rpm, tpm, request_id)
  if rate[1] == 0 then
    abandon()
    return {'rate', rate[2], rate[3]}
  end
end
local admitted = admission_acquire(KEYS[5], KEYS[6], now, tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), request_id)
if admitted ~= 1 then
  abandon()
  if limited then redis.call('ZREM', KEYS[3], request_id) end
  return {'shed', admitted}
end
local reserved = budget_reserve(KEYS[8], KEYS[7], ARGV[18], ARGV[19], ARGV[11], tonumber(ARGV[20]), ARGV[21], ARGV[22])
if reserved[1] ~= 'ok' then
  abandon()
  if limited then redis.call('ZREM', KEYS[3], request_id) end
  redis.call('ZREM', KEYS[5], request_id)
  redis.call('ZREM', KEYS[6], request_id)
  if reserved[1] == 'unknown' then return {'budget_unknown'} end
  return reserved
end
redis.call('HSET', KEYS[7], 'tenant_id', ARGV[10], 'session_id', ARGV[11], 'status', 'queued', 'created_at', ARGV[13],
  'updated_at', ARGV[13], 'attempt', '1', 'owner', '', 'payload', ARGV[14], 'deadline_at', ARGV[15], 'dedup_key', ARGV[16])
redis.call('EXPIRE', KEYS[7], ARGV[12])
return {'queued', request_id}
"""
)

# The start script, registered on each event loop's client.
_start_scripts: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
# Celery's publish blocks on the broker's socket: it runs in a pool of this process's
# threads, off the event loop, sized by [queues] publish_threads when first used.
_publisher: ThreadPoolExecutor | None = None


def publisher() -> ThreadPoolExecutor:
    global _publisher
    if _publisher is None:
        _publisher = ThreadPoolExecutor(max_workers=get_config().queues.publish_threads, thread_name_prefix="publish")
    return _publisher


# Runs this gateway makes itself while the broker is down (kept referenced while they run).
_runs_here: set[asyncio.Future[None]] = set()


async def ainfer_start(*, request: PromptRequest, rates: TenantRates | None = None) -> Started:
    """Deduplicate, limit, admit, record and publish the request (see the module's
    docstring), or raise why not. Attached and cached answers cost no upstream call and
    are not counted against the tenant's rate limits. Shielded: a client that leaves
    meanwhile cannot stop a request half-way between admitted and published."""
    starting = asyncio.ensure_future(_start(request, rates or TenantRates(), get_config()))
    # A client that left is not told how its start ended (a refusal, say): read it here,
    # or asyncio would log it as an exception nobody retrieved.
    starting.add_done_callback(lambda task: task.cancelled() or task.exception())
    return await asyncio.shield(starting)


async def _start(request: PromptRequest, rates: TenantRates, config: PipelineSettings) -> Started:
    if not shared_state.available():
        return await _start_without_redis(request, rates, config)
    key = dedup_key(request) if config.dedup.enabled and request.dedup is not DedupMode.OFF else None
    worst_case = budgets.worst_case_nano(request, config, budgets.gateway_prompt_bound(request, config))
    try:
        reply = await _run_start_script(request, rates, config, key, worst_case)
        if _text(reply[0]) == "budget_unknown":
            # Redis does not know the tenant's budgets (new to it, or it lost its data):
            # from Postgres and the ledger, then the start again.
            await sync_to_async(_returning_the_connection, thread_sensitive=False)(budgets.rebuild, request.tenant_id)
            reply = await _run_start_script(request, rates, config, key, worst_case)
    except ServiceUnavailable as exc:
        if exc.data.get("service") == "postgres":
            raise
        shared_state.failed("start the request", exc.__cause__ or exc)
        return await _start_without_redis(request, rates, config)
    shared_state.succeeded()
    kind = _text(reply[0])
    if key is not None:
        answered = _deduplicated(kind, str(reply[1]), key)
        if answered is not None:
            return answered
    if kind == "rate":
        raise gates.rate_limited(str(reply[1]), max(int(reply[2]), 0) / 1000.0, rates)
    max_global, max_per_tenant, _ = gates.admission_bounds(config)
    if kind == "shed":
        raise gates.shed("tenant" if int(reply[1]) == -1 else "global", max_global=max_global, max_per_tenant=max_per_tenant)
    if kind == "over":
        raise budgets.exceeded(budget.Over.from_reply(reply))
    if kind == "budget_unknown":  # lost again between the rebuild and the start: refused, not run uncounted
        raise ServiceUnavailable("the budgets could not be loaded; retry shortly", data={"service": "redis"}, retry_after=1.0)
    publish = functools.partial(realtime_publish, request.request_id, 1, queue_lease_s=config.limits.queue_lease_s, lease=False)
    try:
        # In this request's context: its trace goes with the message.
        await asyncio.get_running_loop().run_in_executor(publisher(), contextvars.copy_context().run, publish)
    except ServiceUnavailable:
        _run_here(request.request_id)
        return Started(StartKind.RUN_HERE, request.request_id)
    # The lease's round trip is not the client's to wait for: the message is on its way.
    publisher().submit(start_lease, request.request_id, queue_lease_s=config.limits.queue_lease_s)
    return Started(StartKind.SUBMITTED, request.request_id)


async def _run_start_script(request: PromptRequest, rates: TenantRates, config: PipelineSettings, key: str | None, worst_case_nano: int) -> Any:
    bus = get_bus()
    client = bus.redis.aclient()
    max_global, max_per_tenant, slot_lease_s = gates.admission_bounds(config)
    inflight, done, _ = dedup.keys(bus.prefix, key or "")
    keys = [
        inflight,
        done,
        *ratelimit.keys(bus.prefix, request.tenant_id),
        *admission.keys(bus.prefix, request.tenant_id),
        bus.record_key(request.request_id),
        budget.definitions_key(bus.prefix, request.tenant_id),
    ]
    now = time.time()
    args: list[str | int | float] = [
        request.request_id,
        config.dedup.window_s if key else 0,
        now,
        ratelimit.WINDOW_S,
        rates.requests_per_minute,
        rates.tokens_per_minute,
        slot_lease_s,
        max_global,
        max_per_tenant,
        request.tenant_id,
        request.session_id,
        bus.ttl_s,
        f"{now:.6f}",
        json.dumps(request.to_dict()),
        f"{now + config.limits.request_timeout_s:.6f}",
        key or "",
        "1" if request.dedup is DedupMode.FULL else "0",
        bus.prefix,
        "" if request.api_key_id is None else request.api_key_id,
        worst_case_nano,
        *budget.period_ids(now),
    ]
    script = _start_scripts.get(client)
    if script is None:
        script = _start_scripts[client] = client.register_script(START_SCRIPT)
    with redis_errors("start the request"):
        return await script(keys=keys, args=args)


def _deduplicated(kind: str, value: str, key: str) -> Started | None:
    """A deduplication claim's outcome: the answer it found (from the window, or the
    stream of the identical request in flight), or None (the claim is this request's)."""
    hit = kind in ("done", "inflight")
    metrics.child(metrics.DEDUP_REQUESTS, "hit" if hit else "miss").inc()
    telemetry.annotate(dedup_key=key, cache_hit=hit)
    if kind == "done":
        result = PipelineResult.from_dict(json.loads(value))
        return Started(StartKind.CACHED, result.request_id, result)
    if kind == "inflight":
        return Started(StartKind.ATTACHED, value)
    return None


def realtime_publish(request_id: str, attempt: int, *, queue_lease_s: float, lease: bool = True) -> None:
    """Celery's publish of ``run_realtime(request_id, attempt)``, then (unless ``lease``
    is False: the caller starts it) the request's lease. ``ServiceUnavailable`` when
    the broker is down: the message did not leave."""
    from pipeline.tasks import run_realtime

    try:
        # The task id is the request's, for every attempt: revoking it stops them all.
        run_realtime.apply_async(args=(request_id, attempt), task_id=request_id, retry=False)
    except KombuOperationalError as exc:
        log.warning("broker_unavailable", request_id=request_id, outcome="degraded", error_type=type(exc).__name__)
        raise ServiceUnavailable("the broker is unavailable", data={"service": "broker"}) from exc
    if lease:
        start_lease(request_id, queue_lease_s=queue_lease_s)


def start_lease(request_id: str, *, queue_lease_s: float) -> None:
    """A published request's lease (``tokenbus.fencing``); Redis refusing is only logged."""
    try:
        fencing.lease_published(get_bus(), request_id, lease_s=queue_lease_s)
    except ServiceUnavailable as exc:
        # The message is out: the run that begins it starts a lease of its own.
        log.warning("lease_unrecorded", request_id=request_id, outcome="degraded", error_type=type(exc.__cause__ or exc).__name__)


def _run_here(request_id: str) -> None:
    """Run attempt 1 in this process, as a worker would (the broker is down)."""
    from pipeline.services import execute

    # Handed to a thread now, not when the event loop next runs a task: it runs to its
    # end even if the loop stops first.
    run = asyncio.get_running_loop().run_in_executor(None, contextvars.copy_context().run, execute.realtime_execute_here, request_id)
    _runs_here.add(run)
    run.add_done_callback(_runs_here.discard)


async def _start_without_redis(request: PromptRequest, rates: TenantRates, config: PipelineSettings) -> Started:
    """Redis is down. A request under a budget is refused: its spend could not be
    counted (fail closed). Any other is run here."""
    applies = sync_to_async(_returning_the_connection, thread_sensitive=False)
    if await applies(budgets.apply_anywhere, request.tenant_id, request.api_key_id, request.session_id):
        raise ServiceUnavailable(
            "a budget applies to this request and cannot be checked while Redis is unavailable; retry shortly",
            data={"service": "redis", "reason": "budget"},
            retry_after=5.0,
        )
    return _start_here(request, rates, config)


def _returning_the_connection(read: Callable[..., Any], *args: Any) -> Any:
    """``read(*args)`` in an executor thread, its database connection handed back to
    the pool afterwards: Django does that for a request's own thread only, and an
    executor thread would hold a connection for ever (or keep one that broke)."""
    try:
        return read(*args)
    finally:
        close_old_connections()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _start_here(request: PromptRequest, rates: TenantRates, config: PipelineSettings) -> Started:
    """Redis is down: this process's own gates, and the request runs here (``services.inline``)."""
    if config.dedup.enabled and request.dedup is DedupMode.FULL:
        kind, value = gates.local_dedup(config).claim(dedup_key(request), request.request_id)
        if kind == "done":
            result = PipelineResult.from_dict(json.loads(value))
            return Started(StartKind.CACHED, result.request_id, result)
    limiter = gates.local_limiter()
    verdict = limiter.check(request.tenant_id, request.request_id, rates)
    if not verdict.allowed:
        raise gates.rate_limited(verdict.kind, verdict.retry_after_s, rates)
    slots = gates.local_admission(config)
    admitted = slots.acquire(request.tenant_id, request.request_id)
    if not admitted.admitted:
        limiter.forget(request.tenant_id, request.request_id)
        raise gates.shed(admitted.scope, max_global=slots.max_global, max_per_tenant=slots.max_per_tenant)
    return Started(StartKind.LOCAL, request.request_id)
