"""Bounded admission to the real-time queue, per tenant and globally, held in Redis.

Each admitted request holds a lease (a member of two sorted sets scored by
time) until it finishes or the lease expires, so a worker that dies never
leaks a slot. Check-and-admit is one Lua script: atomic across every gateway
process. A full queue sheds at once; it never makes the caller wait.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from pipeline.tokenbus import redis_errors

# KEYS: global set, tenant set. ARGV: now, lease_s, global max, tenant max, member.
# Returns 1 admitted, 0 global queue full, -1 tenant queue full.
_ACQUIRE = """
local now, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - lease)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - lease)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return -1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('ZADD', KEYS[2], now, ARGV[5])
redis.call('EXPIRE', KEYS[1], math.ceil(lease))
redis.call('EXPIRE', KEYS[2], math.ceil(lease))
return 1
"""


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    scope: str = ""  # "tenant" or "global" when shed


class Admission:
    def __init__(self, client: redis.Redis, *, prefix: str, max_global: int, max_per_tenant: int, lease_s: float) -> None:
        self._client = client
        self._prefix = prefix
        self.max_global = max_global
        self.max_per_tenant = max_per_tenant
        self.lease_s = lease_s
        self._script: Any = client.register_script(_ACQUIRE)

    def _keys(self, tenant_id: str) -> list[str]:
        return [f"{self._prefix}:inflight", f"{self._prefix}:inflight:{tenant_id}"]

    def acquire(self, tenant_id: str, request_id: str) -> Verdict:
        with redis_errors("admit the request"):
            result = int(self._script(keys=self._keys(tenant_id), args=[time.time(), self.lease_s, self.max_global, self.max_per_tenant, request_id]))
        if result == 1:
            return Verdict(admitted=True)
        return Verdict(admitted=False, scope="tenant" if result == -1 else "global")

    def release(self, tenant_id: str, request_id: str) -> None:
        global_key, tenant_key = self._keys(tenant_id)
        with redis_errors("release the request's slot"):
            pipe = self._client.pipeline(transaction=False)
            pipe.zrem(global_key, request_id)
            pipe.zrem(tenant_key, request_id)
            pipe.execute()

    def in_flight(self, tenant_id: str | None = None) -> int:
        global_key, tenant_key = self._keys(tenant_id or "")
        with redis_errors("count requests in flight"):
            return int(self._client.zcard(tenant_key if tenant_id else global_key))
