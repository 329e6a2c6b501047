"""The deduplication key: a hash of the tenant and everything in a request that can change its answer.

Left out, because they cannot change the answer: the request id and the
metadata; the order of the stop sequences. Kept exactly (no case or space
folding): the prompt, since a model may answer "Hi" and "hi " differently.
The session id is in, since the session's history is part of the prompt —
unless the client named none (the session is then the request's own, with no
history, and identical stateless requests must meet) — and so is a
conversation the client sent with the request, with its tool calls and results,
and every optional generation field (tools, response format, sampling).
The version prefix changes when this definition does.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from pipeline.shared_redis import redis_errors
from pipeline.types import PromptRequest

KEY_VERSION = 5  # 2: the client's conversation; 3: the config version; 4: the seed; 5: options, tools


def normalised(request: PromptRequest) -> dict[str, object]:
    return {
        "v": KEY_VERSION,
        "tenant": request.tenant_id,
        "session": request.session_id if request.names_session else "",
        "prompt": request.prompt,
        "worker": request.worker,
        "model": request.model,
        "max_tokens": request.max_tokens,
        "temperature": None if request.temperature is None else float(request.temperature),
        "stop": sorted(set(request.stop)),
        "history": [m.to_dict() for m in request.history],
        "tool_turns": [m.to_dict() for m in request.tool_turns],
        "options": request.options.to_dict(),
        # Another config version may answer otherwise (its prompts, its stop sequences).
        "config": request.config_version,
        "seed": request.seed,
    }


def dedup_key(request: PromptRequest) -> str:
    canonical = json.dumps(normalised(request), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


# --- the cluster-wide store ---------------------------------------------------------------

# The claim, as a Lua function that other scripts compose (``pipeline.intake``): the
# finished result {"done", result}, the owner in flight {"inflight", request_id}, or
# {"claimed", request_id} (this request is now the owner, for window_s at most).
CLAIM_FUNCTION = """
local function dedup_claim(inflight_key, done_key, request_id, window_s, serve_done)
  if serve_done == '1' then
    local done = redis.call('GET', done_key)
    if done then return {'done', done} end
  end
  local owner = redis.call('GET', inflight_key)
  if owner then return {'inflight', owner} end
  redis.call('SET', inflight_key, request_id, 'EX', window_s)
  return {'claimed', request_id}
end
"""

# KEYS: inflight key, done key. ARGV: request_id, window_s, serve a finished answer (1/0).
# One script, so two gateways never both become the producer of the same answer.
_CLAIM = CLAIM_FUNCTION + "return dedup_claim(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])\n"

# KEYS: inflight key, done key, index. ARGV: result json, window_s, now, max_entries, key.
_COMPLETE = """
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', tonumber(ARGV[3]) - tonumber(ARGV[2]))
local extra = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[4])
if extra > 0 then
  local done_prefix = string.sub(KEYS[2], 1, #KEYS[2] - #ARGV[5])
  for _, old in ipairs(redis.call('ZRANGE', KEYS[3], 0, extra - 1)) do
    redis.call('DEL', done_prefix .. old)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, extra - 1)
end
return 1
"""


def keys(prefix: str, key: str) -> tuple[str, str, str]:
    """The key's owner in flight, its finished result, and the index of finished results."""
    return f"{prefix}:dedup:inflight:{key}", f"{prefix}:dedup:done:{key}", f"{prefix}:dedup:index"


class DedupStore:
    """In-flight owners and finished results per key, for ``window_s`` seconds,
    at most ``max_entries`` finished results (the oldest are dropped first)."""

    def __init__(self, client: Any, *, prefix: str, window_s: int, max_entries: int) -> None:
        self._client = client
        self._prefix = prefix
        self.window_s = window_s
        self.max_entries = max_entries
        self._claim: Any = client.register_script(_CLAIM)
        self._complete: Any = client.register_script(_COMPLETE)

    def _keys(self, key: str) -> tuple[str, str, str]:
        return keys(self._prefix, key)

    def claim(self, key: str, request_id: str, *, serve_done: bool = True) -> tuple[str, str]:
        """("claimed", request_id): run it; ("inflight", owner): wait for the owner's
        stream; ("done", result json): answer from the window (only if ``serve_done``)."""
        inflight, done, _ = self._keys(key)
        with redis_errors("look up the deduplication window"):
            kind, value = self._claim(keys=[inflight, done], args=[request_id, self.window_s, "1" if serve_done else "0"])
        return _text(kind), _text(value)

    def complete(self, key: str, result_json: str) -> None:
        with redis_errors("record the deduplicated result"):
            self._complete(keys=list(self._keys(key)), args=self._complete_args(key, result_json))

    def queue_complete(self, pipe: Any, key: str, result_json: str) -> None:
        """``complete`` as one more command of ``pipe`` (a settle's pipeline). By its
        source, not its hash: a pipeline holding a script by hash asks first whether
        the server has it, a round trip of its own."""
        pipe.eval(_COMPLETE, 3, *self._keys(key), *self._complete_args(key, result_json))

    def queue_release(self, pipe: Any, key: str) -> None:
        """The owner finished an answer that is not to be served again: identical
        requests from now on run on their own."""
        pipe.delete(self._keys(key)[0])

    def _complete_args(self, key: str, result_json: str) -> list[Any]:
        return [result_json, self.window_s, time.time(), self.max_entries, key]

    def abandon(self, key: str, request_id: str) -> None:
        """The owner failed: nobody else may wait on it, and errors are not cached."""
        inflight, _, _ = self._keys(key)
        with redis_errors("clear the deduplication entry"):
            if _text(self._client.get(inflight) or "") == request_id:
                self._client.delete(inflight)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
