"""A circuit breaker per worker, its state shared by every process through Redis.

    closed ──(failure_threshold consecutive transient failures)──▶ open
    open ──(open_s elapsed)──▶ half-open: at most half_open_trials calls go through
    half-open ──success──▶ closed          half-open ──failure──▶ open (again for open_s)

Only transient failures (the provider being down, slow or rate limiting) count;
a permanent error says nothing about the provider's health. Each transition is
one Lua script, so two processes never disagree about the state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import redis

from pipeline.shared_redis import redis_errors


class BreakerState(IntEnum):
    """The values of the orchestrator_circuit_breaker_state gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


# May a call go to the worker? KEYS[1]: the worker's hash. ARGV: now, open_s,
# half_open_trials. Returns {allowed, state, retry_after_ms}.
_ALLOW = """
local function breaker_allow(key, now, open_s, trials)
  local state = tonumber(redis.call('HGET', key, 'state') or '0')
  if state == 2 then
    local opened = tonumber(redis.call('HGET', key, 'opened_at') or '0')
    if now - opened < open_s then
      return {0, 2, math.ceil((opened + open_s - now) * 1000)}
    end
    redis.call('HSET', key, 'state', 1, 'trials', 0, 'half_opened_at', now)
    state = 1
  end
  if state == 1 then
    -- A trial whose outcome never came (its request died) must not wedge the breaker:
    -- after another open_s, new trials are allowed.
    local since = tonumber(redis.call('HGET', key, 'half_opened_at') or '0')
    if now - since >= open_s then
      redis.call('HSET', key, 'trials', 0, 'half_opened_at', now)
    end
    local used = redis.call('HINCRBY', key, 'trials', 1)
    if used > trials then
      redis.call('HINCRBY', key, 'trials', -1)
      return {0, 1, 1000}
    end
    return {1, 1, 0}
  end
  return {1, 0, 0}
end
return breaker_allow(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
"""

# ARGV: outcome ('ok' | 'fail'), now, failure_threshold. Returns the new state.
_RECORD = """
local state = tonumber(redis.call('HGET', KEYS[1], 'state') or '0')
if ARGV[1] == 'ok' then
  if state ~= 0 then redis.call('HSET', KEYS[1], 'state', 0, 'trials', 0) end
  redis.call('HSET', KEYS[1], 'failures', 0)
  return 0
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if state == 1 or failures >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'state', 2, 'opened_at', ARGV[2], 'trials', 0)
  return 2
end
return state
"""


@dataclass(frozen=True)
class BreakerPolicy:
    failure_threshold: int = 5
    open_s: float = 30.0
    half_open_trials: int = 1


@dataclass(frozen=True)
class Permission:
    allowed: bool
    state: BreakerState
    retry_after_s: float = 0.0


class CircuitBreaker:
    def __init__(self, client: redis.Redis, *, prefix: str, worker: str, policy: BreakerPolicy) -> None:
        self.worker = worker
        self.policy = policy
        self._client = client
        self._key = f"{prefix}:breaker:{worker}"
        self._allow: Any = client.register_script(_ALLOW)
        self._record: Any = client.register_script(_RECORD)

    def allow(self) -> Permission:
        with redis_errors("check the circuit breaker"):
            reply = self._allow(keys=[self._key], args=[time.time(), self.policy.open_s, self.policy.half_open_trials])
        return _permission(*reply)

    def record(self, *, success: bool) -> BreakerState:
        with redis_errors("record the circuit breaker outcome"):
            state = self._record(keys=[self._key], args=["ok" if success else "fail", time.time(), self.policy.failure_threshold])
        return BreakerState(int(state))

    def state(self) -> BreakerState:
        with redis_errors("read the circuit breaker"):
            raw = self._client.hget(self._key, "state")
        if raw is None:
            return BreakerState.CLOSED
        return BreakerState(int(raw))


def _permission(allowed: object, state: object, retry_ms: object) -> Permission:
    return Permission(allowed=bool(int(str(allowed))), state=BreakerState(int(str(state))), retry_after_s=int(str(retry_ms)) / 1000.0)


def read_states(client: redis.Redis, *, prefix: str, workers: list[str]) -> dict[str, BreakerState]:
    """Every named worker's stored state in one round trip (for the metrics scrape).
    An open breaker whose ``open_s`` has passed reads as open until a request tries it."""
    with redis_errors("read the circuit breakers"):
        pipe = client.pipeline(transaction=False)
        for worker in workers:
            pipe.hget(f"{prefix}:breaker:{worker}", "state")
        raw = pipe.execute()
    return {worker: BreakerState(int(value)) if value is not None else BreakerState.CLOSED for worker, value in zip(workers, raw, strict=True)}
