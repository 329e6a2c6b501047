"""Which run of a request may write its answer: attempts, owners and leases.

Every run of a request carries an attempt number (1 at the start; the lease
sweep publishes the next one). A run that begins the current attempt becomes
its ``owner`` (a token of its own), and from then on only that owner may write
the request's events (``tokenbus.producer``): a late or duplicate run, or one
that lost its lease, is refused in the same Lua script that would have written.
So a client never reads tokens from two runs, and the answer is settled once.

Leases (``<prefix>:leases``, scored by when they lapse) say that someone still
answers for the request: the gateway's publish starts one, the run that begins
it renews it while it runs (``services.leases``), the end of the run removes
it. A lapsed lease is decided by ``LAPSE``, atomically, whoever sweeps:

- a request that no run began, or whose run died before its first token, is
  published again as the next attempt (the owner is cleared: the old run, if it
  still lives, can no longer write);
- one whose tokens already reached readers fails with ``worker_lost`` (a rerun
  would repeat them), and so does one whose runs died ``max_runs`` times;
- one past its deadline fails with ``worker_timeout``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from orchestrator_site.errors import OrchestratorError, WorkerLost, WorkerTimeout
from pipeline.shared_redis import redis_errors
from pipeline.tokenbus.bus import TokenBus

# KEYS: record, leases. ARGV: request_id, attempt, owner, now, lease until, ttl_s, executed_by.
# Returns {"run", payload, created_at, deadline_at} or {why not}.
BEGIN = """
local state = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'owner', 'payload', 'created_at', 'deadline_at', 'reserved')
if not state[1] then return {'missing'} end
if state[1] == 'completed' or state[1] == 'failed' then return {'finished'} end
if state[2] ~= ARGV[2] then return {'superseded'} end
if state[3] and state[3] ~= '' then return {'taken'} end
redis.call('HSET', KEYS[1], 'status', 'running', 'owner', ARGV[3], 'executed_by', ARGV[7], 'updated_at', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'runs', 1)
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
return {'run', state[4] or '', state[5] or '', state[6] or '', state[7] or '0'}
"""

# KEYS: leases, then one record per lease. ARGV: lease until, then request_id, attempt and
# owner per lease ("" for a message received but not begun). Returns how many were renewed.
RENEW = """
local renewed = 0
for i = 2, #KEYS do
  local at = 3 * (i - 2) + 2
  local state = redis.call('HMGET', KEYS[i], 'attempt', 'owner', 'status')
  if state[1] == ARGV[at + 1] and (state[2] or '') == ARGV[at + 2] and state[3] ~= 'completed' and state[3] ~= 'failed' then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[at])
    renewed = renewed + 1
  end
end
return renewed
"""

# KEYS: record, stream, leases. ARGV: request_id, now, the next attempt's lease, max_runs,
# maxlen, ttl_s, worker_lost's body, worker_timeout's body.
# Returns {"alive"} | {"gone"} | {outcome, tenant_id, attempt, dedup_key}.
LAPSE = """
local score = redis.call('ZSCORE', KEYS[3], ARGV[1])
local now = tonumber(ARGV[2])
if not score or tonumber(score) > now then return {'alive'} end
local s = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'streamed', 'runs', 'deadline_at', 'tenant_id', 'dedup_key')
if not s[1] or s[1] == 'completed' or s[1] == 'failed' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return {'gone'}
end
local body = false
local outcome = 'republish'
if s[3] == '1' or tonumber(s[4] or '0') >= tonumber(ARGV[4]) then
  outcome, body = 'lost', ARGV[7]
elseif s[5] and s[5] ~= '' and tonumber(s[5]) <= now then
  outcome, body = 'timeout', ARGV[8]
end
if body then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'type', 'error', 'attempt', s[2], 'data', body)
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  redis.call('HSET', KEYS[1], 'status', 'failed', 'owner', '', 'updated_at', ARGV[2])
  redis.call('ZREM', KEYS[3], ARGV[1])
  return {outcome, s[6] or '', s[2], s[7] or ''}
end
local next_attempt = tostring(tonumber(s[2]) + 1)
redis.call('HSET', KEYS[1], 'status', 'queued', 'owner', '', 'attempt', next_attempt, 'updated_at', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return {outcome, s[6] or '', next_attempt, s[7] or ''}
"""


# KEYS: record, stream, leases. ARGV: request_id, now, maxlen, ttl_s, the error's body.
# Fails a request nobody has answered yet, whichever run holds it (its owner is cleared:
# it can no longer write). Returns {tenant_id, dedup_key}, or {} when already finished.
FAIL = """
local s = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'tenant_id', 'dedup_key')
if not s[1] or s[1] == 'completed' or s[1] == 'failed' then return {} end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'type', 'error', 'attempt', s[2], 'data', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('HSET', KEYS[1], 'status', 'failed', 'owner', '', 'updated_at', ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return {s[3] or '', s[4] or ''}
"""


class BeginOutcome(StrEnum):
    RUN = "run"  # this run owns the attempt now
    MISSING = "missing"  # no record (expired, or Redis lost it): nobody to answer
    FINISHED = "finished"  # already answered (a redelivered message)
    SUPERSEDED = "superseded"  # a later attempt was published: this message is stale
    TAKEN = "taken"  # another run of the same attempt began it first


class LapseOutcome(StrEnum):
    ALIVE = "alive"  # renewed meanwhile (or another sweep took it)
    GONE = "gone"  # finished: only its lease was left
    REPUBLISH = "republish"  # publish ``attempt`` (the next one) again
    LOST = "lost"  # failed with worker_lost
    TIMEOUT = "timeout"  # failed with worker_timeout


@dataclass(frozen=True)
class Run:
    """One run of one attempt of a request. ``owner`` is "" until it begins."""

    request_id: str
    attempt: int
    owner: str = ""

    @classmethod
    def new(cls, request_id: str, attempt: int) -> Run:
        return cls(request_id, attempt, owner=f"{attempt}:{uuid.uuid4().hex}")


@dataclass(frozen=True)
class Begun:
    outcome: BeginOutcome
    payload: dict[str, Any] | None = None
    created_at: float | None = None
    deadline_at: float | None = None
    reserved_nano: int = 0  # what budgets hold for it (``services.budgets``); 0: no budget applies


@dataclass(frozen=True)
class Lapsed:
    outcome: LapseOutcome
    request_id: str
    tenant_id: str = ""
    attempt: int = 0
    dedup_key: str = ""


def begin(bus: TokenBus, run: Run, *, lease_s: float, executed_by: str) -> Begun:
    """Make ``run`` the owner of its attempt, if it is still the current one and nobody began it."""
    now = time.time()
    keys = [bus.record_key(run.request_id), bus.leases_key]
    args = [run.request_id, run.attempt, run.owner, f"{now:.6f}", now + lease_s, bus.ttl_s, executed_by]
    with redis_errors("begin the request"):
        reply = bus.script(BEGIN)(keys=keys, args=args)
    outcome = BeginOutcome(str(reply[0]))
    if outcome is not BeginOutcome.RUN:
        return Begun(outcome)
    return Begun(outcome, payload=json.loads(reply[1]), created_at=_number(reply[2]), deadline_at=_number(reply[3]), reserved_nano=int(reply[4]))


def renew(bus: TokenBus, runs: list[Run], *, lease_s: float) -> int:
    """Extend the leases of ``runs`` still current (one round trip); how many were."""
    if not runs:
        return 0
    args: list[Any] = [time.time() + lease_s]
    for run in runs:
        args += [run.request_id, run.attempt, run.owner]
    with redis_errors("renew the leases"):
        return int(bus.script(RENEW)(keys=[bus.leases_key, *(bus.record_key(r.request_id) for r in runs)], args=args))


def lapsed(bus: TokenBus, *, now: float, limit: int = 100) -> list[str]:
    """The requests whose lease has lapsed, oldest first."""
    with redis_errors("read the leases"):
        found: Any = bus.redis.client.zrangebyscore(bus.leases_key, "-inf", now, start=0, num=limit)
    return [str(request_id) for request_id in found]


def lapse(bus: TokenBus, request_id: str, *, next_lease_s: float, max_runs: int) -> Lapsed:
    """Decide one lapsed lease (see the module's docstring)."""
    now = time.time()
    lost = WorkerLost("the worker running this request stopped answering after its first tokens", data={"request_id": request_id}, retry_after=1.0)
    timeout = WorkerTimeout("the request's deadline passed before a worker could run it", data={"request_id": request_id})
    keys = [bus.record_key(request_id), bus.stream_key(request_id), bus.leases_key]
    args = [request_id, now, now + next_lease_s, max_runs, bus.maxlen, bus.ttl_s, json.dumps(lost.to_dict()), json.dumps(timeout.to_dict())]
    with redis_errors("decide a lapsed lease"):
        reply = bus.script(LAPSE)(keys=keys, args=args)
    outcome = LapseOutcome(str(reply[0]))
    if outcome in (LapseOutcome.ALIVE, LapseOutcome.GONE):
        return Lapsed(outcome, request_id)
    return Lapsed(outcome, request_id, tenant_id=str(reply[1]), attempt=int(reply[2]), dedup_key=str(reply[3]))


def fail(bus: TokenBus, request_id: str, error: OrchestratorError) -> tuple[str, str] | None:
    """Fail the request with ``error`` unless it is answered already: its (tenant_id,
    dedup_key), or None when it was."""
    keys = [bus.record_key(request_id), bus.stream_key(request_id), bus.leases_key]
    args = [request_id, f"{time.time():.6f}", bus.maxlen, bus.ttl_s, json.dumps(error.to_dict())]
    with redis_errors("fail the request"):
        reply = bus.script(FAIL)(keys=keys, args=args)
    return (str(reply[0]), str(reply[1])) if reply else None


def lease_published(bus: TokenBus, request_id: str, *, lease_s: float) -> None:
    """A request's message is on the broker: its lease starts (unless a run holds one already)."""
    with redis_errors("start the request's lease"):
        bus.redis.client.zadd(bus.leases_key, {request_id: time.time() + lease_s}, nx=True)


def _number(raw: object) -> float | None:
    try:
        return float(str(raw)) if raw not in (None, "") else None
    except ValueError:
        return None
