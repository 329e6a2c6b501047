"""Per-tenant rate limits — requests per minute and tokens per minute — held in Redis.

Both are sliding-window logs (a sorted set scored by time), so "N per minute"
means at most N in any 60 seconds. The check and the increment are one Lua
script: the limit holds across every gateway process. Tokens are known only
when a request finishes: the worker records them, and a tenant already at its
token limit is refused until enough of the window has passed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from pipeline.shared_redis import redis_errors

# The check-and-count, as a Lua function that other scripts compose (``pipeline.intake``):
# {1} counted, or {0, kind, retry_after_ms}. rpm and tpm 0: no such limit.
CHECK_FUNCTION = """
local function rate_check(requests_key, tokens_key, now, window, rpm, tpm, member)
  redis.call('ZREMRANGEBYSCORE', requests_key, '-inf', now - window)
  redis.call('ZREMRANGEBYSCORE', tokens_key, '-inf', now - window)
  if rpm > 0 and redis.call('ZCARD', requests_key) >= rpm then
    local oldest = redis.call('ZRANGE', requests_key, 0, 0, 'WITHSCORES')
    return {0, 'requests_per_minute', math.ceil((tonumber(oldest[2]) + window - now) * 1000)}
  end
  if tpm > 0 then
    local used = 0
    local entries = redis.call('ZRANGE', tokens_key, 0, -1, 'WITHSCORES')
    for i = 1, #entries, 2 do
      used = used + tonumber(string.match(entries[i], ':(%d+)$'))
    end
    if used >= tpm then
      return {0, 'tokens_per_minute', math.ceil((tonumber(entries[2]) + window - now) * 1000)}
    end
  end
  redis.call('ZADD', requests_key, now, member)
  redis.call('EXPIRE', requests_key, math.ceil(window))
  return {1}
end
"""

# KEYS: requests log, tokens log. ARGV: now, window, rpm (0 = none), tpm (0 = none), member.
_CHECK = (
    CHECK_FUNCTION
    + """
return rate_check(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5])
"""
)


@dataclass(frozen=True)
class RateVerdict:
    allowed: bool
    kind: str = ""  # "requests_per_minute" or "tokens_per_minute" when refused
    retry_after_s: float = 0.0


@dataclass(frozen=True)
class TenantRates:
    requests_per_minute: int = 0  # 0: unlimited
    tokens_per_minute: int = 0


WINDOW_S = 60.0  # "per minute"


def keys(prefix: str, tenant_id: str) -> list[str]:
    """The tenant's logs: requests, and tokens used."""
    return [f"{prefix}:rate:req:{tenant_id}", f"{prefix}:rate:tok:{tenant_id}"]


class RateLimiter:
    def __init__(self, client: redis.Redis, *, prefix: str, window_s: float = WINDOW_S) -> None:
        self._client = client
        self._prefix = prefix
        self.window_s = window_s
        self._script: Any = client.register_script(_CHECK)

    def _keys(self, tenant_id: str) -> list[str]:
        return keys(self._prefix, tenant_id)

    def check(self, tenant_id: str, request_id: str, rates: TenantRates) -> RateVerdict:
        if not rates.requests_per_minute and not rates.tokens_per_minute:
            return RateVerdict(allowed=True)  # no limit: not even a round trip
        with redis_errors("check the rate limit"):
            result = self._script(keys=self._keys(tenant_id), args=[time.time(), self.window_s, rates.requests_per_minute, rates.tokens_per_minute, request_id])
        if int(result[0]) == 1:
            return RateVerdict(allowed=True)
        kind = result[1].decode() if isinstance(result[1], bytes) else str(result[1])
        return RateVerdict(allowed=False, kind=kind, retry_after_s=max(int(result[2]), 0) / 1000.0)

    def forget(self, tenant_id: str, request_id: str) -> None:
        """Take back a request that was counted but then refused elsewhere (shed)."""
        with redis_errors("update the rate limit"):
            self._client.zrem(self._keys(tenant_id)[0], request_id)

    def record_tokens(self, tenant_id: str, request_id: str, tokens: int) -> None:
        if tokens <= 0:
            return
        with redis_errors("record token usage"):
            pipe = self._client.pipeline(transaction=False)
            self.queue_record_tokens(pipe, tenant_id, request_id, tokens)
            pipe.execute()

    def queue_record_tokens(self, pipe: Any, tenant_id: str, request_id: str, tokens: int) -> None:
        """``record_tokens`` as commands of ``pipe`` (a settle's pipeline)."""
        if tokens <= 0:
            return
        key = self._keys(tenant_id)[1]
        pipe.zadd(key, {f"{request_id}:{tokens}": time.time()})
        pipe.expire(key, int(self.window_s) + 1)
