"""A run's writes to its request's token stream, each refused unless the run owns
the request's current attempt (``tokenbus.fencing``): the check and the write are
one Lua script, so nothing can slip between them.

A token's write also says whether anyone still wants the answer: nobody does
once someone has read the stream and every reader has left (signed out, or its
lease ran out), unless a reader asked to keep the request (its client was told
to poll for the result). The run then stops its upstream call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from pipeline.shared_redis import redis_errors
from pipeline.tokenbus.bus import RequestStatus, TokenBus
from pipeline.tokenbus.fencing import Run
from pipeline.tokenbus.reader import KEEP

# Whether the readers still want the stream, as a Lua function: nobody has read it yet,
# someone asked to keep it, or a reader's lease still runs (scores are negated expiries).
_WANTED_FUNCTION = f"""
local function wanted(readers, now)
  if redis.call('ZCARD', readers) == 0 then return 1 end
  if redis.call('ZSCORE', readers, '{KEEP}') then return 1 end
  if redis.call('ZCOUNT', readers, '(-inf', -now) > 0 then return 1 end
  return 0
end
"""

# KEYS: record, stream, readers. ARGV: owner, attempt, data, maxlen, ttl_s, now.
# Returns -1 (fenced out), 0 (written; nobody wants it any more) or 1 (written).
PUBLISH_TOKEN = (
    _WANTED_FUNCTION
    + """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return -1 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'type', 'token', 'attempt', ARGV[2], 'data', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('HSET', KEYS[1], 'streamed', '1')
return wanted(KEYS[3], tonumber(ARGV[6]))
"""
)

# KEYS: record, stream, leases. ARGV: owner, attempt, event type, data, status, maxlen,
# ttl_s, now, request_id. Returns 1 (written: this run answered) or 0 (fenced out).
FINISH = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'completed' or status == 'failed' then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'type', ARGV[3], 'attempt', ARGV[2], 'data', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[7])
redis.call('HSET', KEYS[1], 'status', ARGV[5], 'updated_at', ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('ZREM', KEYS[3], ARGV[9])
return 1
"""

# KEYS: readers. ARGV: now.
WANTED = _WANTED_FUNCTION + "return wanted(KEYS[1], tonumber(ARGV[1]))\n"


class Fenced(Exception):
    """This run no longer owns its request's attempt: it must stop, silently (another
    run answers, or the request was already answered or failed)."""


class Producer:
    """The writes of ``run`` (which has begun) to its request's stream."""

    def __init__(self, bus: TokenBus, run: Run) -> None:
        self.bus = bus
        self.run = run
        request_id = run.request_id
        self._record, self._stream, self._readers = bus.record_key(request_id), bus.stream_key(request_id), bus.readers_key(request_id)

    def publish_token(self, seq: int, text: str, extras: Mapping[str, Any] | None = None) -> bool:
        """Append a token (``Fenced`` if this run may not); False when nobody wants the
        answer any more (one round trip). ``extras``: a piece's ``tool_calls`` deltas and
        ``logprobs``, where it has them."""
        data = json.dumps({"seq": seq, "text": text, **(extras or {})})
        args = [self.run.owner, self.run.attempt, data, self.bus.maxlen, self.bus.ttl_s, time.time()]
        with redis_errors("publish to the token bus"):
            reply = int(self.bus.script(PUBLISH_TOKEN)(keys=[self._record, self._stream, self._readers], args=args))
        if reply < 0:
            raise Fenced(self.run.request_id)
        return reply == 1

    def finish(self, event_type: str, data: dict[str, Any], *, status: RequestStatus) -> bool:
        """The terminal event and the final status, and the lease gone: True when this
        run's answer is the request's (False: fenced out, someone else answered)."""
        keys = [self._record, self._stream, self.bus.leases_key]
        now = f"{time.time():.6f}"
        args = [self.run.owner, self.run.attempt, event_type, json.dumps(data), status.value, self.bus.maxlen, self.bus.ttl_s, now, self.run.request_id]
        with redis_errors("publish to the token bus"):
            return int(self.bus.script(FINISH)(keys=keys, args=args)) == 1

    def wanted(self) -> bool:
        """False once every reader of the stream has left (and nobody asked to keep it)."""
        with redis_errors("count the stream's readers"):
            return int(self.bus.script(WANTED)(keys=[self._readers], args=[time.time()])) == 1
