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

from pipeline.shared_redis import redis_errors

# Check-and-admit, as a Lua function that other scripts compose (``pipeline.intake``):
# 1 admitted, 0 global queue full, -1 tenant queue full.
ACQUIRE_FUNCTION = """
local function admission_acquire(global_key, tenant_key, now, lease, max_global, max_tenant, member)
  redis.call('ZREMRANGEBYSCORE', global_key, '-inf', now - lease)
  redis.call('ZREMRANGEBYSCORE', tenant_key, '-inf', now - lease)
  if redis.call('ZCARD', tenant_key) >= max_tenant then return -1 end
  if redis.call('ZCARD', global_key) >= max_global then return 0 end
  redis.call('ZADD', global_key, now, member)
  redis.call('ZADD', tenant_key, now, member)
  redis.call('EXPIRE', global_key, math.ceil(lease))
  redis.call('EXPIRE', tenant_key, math.ceil(lease))
  return 1
end
"""

# KEYS: global set, tenant set. ARGV: now, lease_s, global max, tenant max, member.
_ACQUIRE = (
    ACQUIRE_FUNCTION
    + """
return admission_acquire(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5])
"""
)


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    scope: str = ""  # "tenant" or "global" when shed


def keys(prefix: str, tenant_id: str) -> list[str]:
    """The leases in flight: everyone's, the tenant's."""
    return [f"{prefix}:inflight", f"{prefix}:inflight:{tenant_id}"]


class Admission:
    def __init__(self, client: redis.Redis, *, prefix: str, max_global: int, max_per_tenant: int, lease_s: float) -> None:
        self._client = client
        self._prefix = prefix
        self.max_global = max_global
        self.max_per_tenant = max_per_tenant
        self.lease_s = lease_s
        self._script: Any = client.register_script(_ACQUIRE)

    def _keys(self, tenant_id: str) -> list[str]:
        return keys(self._prefix, tenant_id)

    def acquire(self, tenant_id: str, request_id: str) -> Verdict:
        with redis_errors("admit the request"):
            result = int(self._script(keys=self._keys(tenant_id), args=[time.time(), self.lease_s, self.max_global, self.max_per_tenant, request_id]))
        if result == 1:
            return Verdict(admitted=True)
        return Verdict(admitted=False, scope="tenant" if result == -1 else "global")

    def release(self, tenant_id: str, request_id: str) -> None:
        with redis_errors("release the request's slot"):
            pipe = self._client.pipeline(transaction=False)
            self.queue_release(pipe, tenant_id, request_id)
            pipe.execute()

    def queue_release(self, pipe: Any, tenant_id: str, request_id: str) -> None:
        """``release`` as commands of ``pipe`` (a settle's pipeline)."""
        global_key, tenant_key = self._keys(tenant_id)
        pipe.zrem(global_key, request_id)
        pipe.zrem(tenant_key, request_id)

    def in_flight(self, tenant_id: str | None = None) -> int:
        global_key, tenant_key = self._keys(tenant_id or "")
        with redis_errors("count requests in flight"):
            return int(self._client.zcard(tenant_key if tenant_id else global_key))
