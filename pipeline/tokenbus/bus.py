"""The token bus's keys and the request record.

A request has three keys on the shared Redis, all with the bus's TTL:

- ``<prefix>:req:<id>``, the request record (a hash): who it belongs to
  (``tenant_id``, ``session_id``), its ``status``, the request itself
  (``payload``: what a worker runs, so that a message carries only ids), its
  ``deadline_at``, its ``dedup_key``, and which run of it may write
  (``attempt``, ``owner``: ``tokenbus.fencing``);
- ``<prefix>:stream:<id>``, the token stream (a Redis Stream) of ``token``,
  ``done`` and ``error`` events, each tagged with the attempt that wrote it;
- ``<prefix>:subs:<id>``, the stream's readers (``tokenbus.reader``).

``<prefix>:leases`` holds every request that a run holds or that waits in the
broker, scored by when its lease lapses (``services.leases``).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pipeline.shared_redis import SharedRedis, get_redis, redis_errors

TERMINAL_EVENTS = frozenset({"done", "error"})


class RequestStatus(StrEnum):
    """A request's status, as ``GET /api/v1/status/{id}`` shows it."""

    QUEUED = "queued"  # accepted, waiting for a run to begin it
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.COMPLETED, RequestStatus.FAILED)


@dataclass(frozen=True)
class BusEvent:
    id: str
    type: str
    attempt: int
    data: dict[str, Any]


def event_from_entry(entry_id: str, fields: dict[str, str]) -> BusEvent:
    return BusEvent(id=entry_id, type=fields.get("type", ""), attempt=int(fields.get("attempt") or 0), data=json.loads(fields.get("data") or "{}"))


class TokenBus:
    def __init__(self, *, redis: SharedRedis, maxlen: int, ttl_s: int) -> None:
        self.redis = redis
        self.maxlen = maxlen
        self.ttl_s = ttl_s
        self._scripts: dict[str, Any] = {}
        self._scripts_lock = threading.Lock()

    @property
    def prefix(self) -> str:
        return self.redis.prefix

    def stream_key(self, request_id: str) -> str:
        return self.redis.key("stream", request_id)

    def record_key(self, request_id: str) -> str:
        return record_key(self.redis, request_id)

    def readers_key(self, request_id: str) -> str:
        return self.redis.key("subs", request_id)

    @property
    def leases_key(self) -> str:
        return self.redis.key("leases")

    def script(self, source: str) -> Any:
        """``source`` registered on the sync client (its hash sent, the source only when
        the server lacks it)."""
        script = self._scripts.get(source)
        if script is None:
            with self._scripts_lock:
                script = self._scripts.setdefault(source, self.redis.client.register_script(source))
        return script

    # --- the request record -----------------------------------------------------
    def get_record(self, request_id: str) -> dict[str, str]:
        with redis_errors("read the request status"):
            raw: Any = self.redis.client.hgetall(self.record_key(request_id))
        return {str(k): str(v) for k, v in raw.items()}

    def set_record(self, request_id: str, **fields: str) -> None:
        """Fields of the record, without fencing: for a run that no worker can hold (the
        gateway's own, while the broker is down) and for tests."""
        key = self.record_key(request_id)
        with redis_errors("record the request status"):
            pipe = self.redis.client.pipeline(transaction=False)
            mapping: dict[Any, Any] = {**fields, "updated_at": f"{time.time():.6f}"}
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    def append(self, request_id: str, event_type: str, data: dict[str, Any], *, attempt: int = 0) -> str:
        """An event, without fencing (see ``set_record``)."""
        key = self.stream_key(request_id)
        with redis_errors("publish to the token bus"):
            pipe = self.redis.client.pipeline(transaction=False)
            pipe.xadd(key, {"type": event_type, "attempt": attempt, "data": json.dumps(data)}, maxlen=self.maxlen, approximate=True)
            pipe.expire(key, self.ttl_s)
            entry_id, _ = pipe.execute()
        return str(entry_id)

    def read_all(self, request_id: str) -> list[BusEvent]:
        with redis_errors("read the token bus"):
            entries: Any = self.redis.client.xrange(self.stream_key(request_id))
        return [event_from_entry(entry_id, fields) for entry_id, fields in entries]


_bus: TokenBus | None = None
_bus_lock = threading.Lock()


def record_key(redis: SharedRedis, request_id: str) -> str:
    """Where a request's record lives (its status, owner and payload)."""
    return redis.key("req", request_id)


def get_bus() -> TokenBus:
    global _bus
    if _bus is None:
        from pipeline.config import get_config

        cfg = get_config().tokenbus
        with _bus_lock:
            if _bus is None:
                _bus = TokenBus(redis=get_redis(), maxlen=cfg.maxlen, ttl_s=cfg.ttl_s)
    return _bus


def set_bus(bus: TokenBus | None) -> None:
    """Replace (or with None, forget) this process's bus: tests give it other limits or a dead server."""
    global _bus
    with _bus_lock:
        _bus = bus
