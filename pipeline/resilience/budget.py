"""Spend budgets, held in Redis: reserve a request's worst case, correct it, settle it.

Amounts are integers of nano-USD (1e-9 USD): Redis adds them exactly, and a price
of a few cents per million tokens still counts per token.

Keys, each known only here:

- ``<prefix>:budgets:<tenant>``, the tenant's budget definitions (a hash, written by
  ``services.budgets`` from Postgres): field ``tenant``, ``key:<api key id>`` or
  ``session:<session id>``, value ``id|limit|period|scope``; field ``loaded``
  says the hash was written, so a missing hash means "not known yet" (Redis lost
  it, or the tenant was never looked up), not "no budgets".
- ``<prefix>:budget:<id>:<period>``, one budget's spend in one period (``d2026-12-07``,
  ``m2026-12``, ``total``): fields ``spent`` and ``reserved``, and the budget's
  ``limit``, ``period`` and ``scope`` as of its last reservation. A new period is a
  new key: that is the reset.
- The request's record (the token bus's hash): ``budget_keys`` (the spend keys it
  reserved against) and ``reserved`` (how much, on each). Settling or releasing
  removes them, so a second settle changes nothing.

A reservation is all or none: either every budget that applies can take the
amount and each is charged it, or none is.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from pipeline.shared_redis import redis_errors

NANO_PER_USD = 1_000_000_000


class Period(StrEnum):
    DAY = "day"
    MONTH = "month"
    TOTAL = "total"


class Scope(StrEnum):
    TENANT = "tenant"
    KEY = "key"
    SESSION = "session"


# How long a period's spend key outlives its period (a total's never expires).
_KEY_TTL_S = {Period.DAY: 2 * 86_400, Period.MONTH: 40 * 86_400}


def period_ids(now: float) -> tuple[str, str]:
    """The ids of the day and the month (UTC) that ``now`` falls in."""
    at = dt.datetime.fromtimestamp(now, tz=dt.UTC)
    return f"d{at:%Y-%m-%d}", f"m{at:%Y-%m}"


def period_start(period: Period, now: float) -> dt.datetime | None:
    """When the period ``now`` falls in began (UTC); None for a total."""
    at = dt.datetime.fromtimestamp(now, tz=dt.UTC)
    if period is Period.DAY:
        return at.replace(hour=0, minute=0, second=0, microsecond=0)
    if period is Period.MONTH:
        return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return None


def resets_at(period: Period, now: float) -> dt.datetime | None:
    """When the period ``now`` falls in ends and its spend starts again at 0; None for a total."""
    start = period_start(period, now)
    if start is None:
        return None
    if period is Period.DAY:
        return start + dt.timedelta(days=1)
    return (start + dt.timedelta(days=32)).replace(day=1)


def nano_cost(tokens_in: int, tokens_out: int, *, price_input_per_mtok: float, price_output_per_mtok: float) -> int:
    """What ``tokens_in`` prompt and ``tokens_out`` answer tokens cost, in nano-USD
    (a price per million tokens is a thousand nano-USD per token per dollar)."""
    return round(tokens_in * price_input_per_mtok * 1000 + tokens_out * price_output_per_mtok * 1000)


def definitions_key(prefix: str, tenant_id: str) -> str:
    return f"{prefix}:budgets:{tenant_id}"


def spend_key(prefix: str, budget_id: int | str, period_id: str) -> str:
    return f"{prefix}:budget:{budget_id}:{period_id}"


def definition(budget_id: int, limit_nano: int, period: Period, scope: Scope) -> str:
    return f"{budget_id}|{limit_nano}|{period.value}|{scope.value}"


# Lua functions that other scripts compose (the request's start script).
#
# budget_reserve(definitions, record, prefix, key_id, session_id, amount, day_id, month_id)
#   {'ok', n} reserved against n budgets (0: none applies), the record noted;
#   {'unknown'} the tenant's definitions are not in Redis (load them, then start again);
#   {'over', id, scope, remaining, period, limit} that budget cannot take ``amount``.
FUNCTIONS = """
local function budget_targets(definitions, prefix, key_id, session_id, day_id, month_id)
  local found = redis.call('HMGET', definitions, 'tenant', 'key:' .. key_id, 'session:' .. session_id)
  local targets = {}
  for i = 1, 3 do
    if found[i] then
      local id, limit, period, scope = string.match(found[i], '^([^|]+)|([^|]+)|([^|]+)|([^|]+)$')
      local period_id = 'total'
      if period == 'day' then period_id = day_id elseif period == 'month' then period_id = month_id end
      table.insert(targets, {key = prefix .. ':budget:' .. id .. ':' .. period_id, limit = tonumber(limit), id = id, period = period, scope = scope})
    end
  end
  return targets
end

-- Take back ``amount`` of a spend key's reservations, never below nothing: a key that
-- Redis lost (evicted) since the reservation must not come back owing a negative
-- reservation, which would let later requests past the limit.
local function budget_unreserve(key, amount)
  local held = tonumber(redis.call('HGET', key, 'reserved') or '0')
  if held < amount then amount = held end
  if amount ~= 0 then redis.call('HINCRBY', key, 'reserved', -amount) end
end

local function budget_over(target, used, amount)
  return {'over', target.id, target.scope, math.max(target.limit - used, 0), target.period, target.limit}
end

local function budget_reserve(definitions, record, prefix, key_id, session_id, amount, day_id, month_id)
  if redis.call('EXISTS', definitions) == 0 then return {'unknown'} end
  local targets = budget_targets(definitions, prefix, key_id, session_id, day_id, month_id)
  for _, target in ipairs(targets) do
    local spend = redis.call('HMGET', target.key, 'spent', 'reserved')
    local used = tonumber(spend[1] or '0') + tonumber(spend[2] or '0')
    if used + amount > target.limit then return budget_over(target, used, amount) end
  end
  local keys = {}
  for _, target in ipairs(targets) do
    redis.call('HINCRBY', target.key, 'reserved', amount)
    redis.call('HSET', target.key, 'limit', target.limit, 'id', target.id, 'period', target.period, 'scope', target.scope)
    if target.period == 'day' then redis.call('EXPIRE', target.key, 172800)
    elseif target.period == 'month' then redis.call('EXPIRE', target.key, 3456000) end
    table.insert(keys, target.key)
  end
  if #keys > 0 then redis.call('HSET', record, 'budget_keys', table.concat(keys, ' '), 'reserved', amount) end
  return {'ok', #keys}
end

-- The record's reservation ended: each budget's reserved amount taken back and
-- ``charge`` added to its spend. Returns what was reserved (0: nothing was).
local function budget_settle(record, charge)
  local noted = redis.call('HMGET', record, 'budget_keys', 'reserved')
  if not noted[1] or noted[1] == '' then return 0 end
  local reserved = tonumber(noted[2])
  for key in string.gmatch(noted[1], '%S+') do
    budget_unreserve(key, reserved)
    if charge > 0 then redis.call('HINCRBY', key, 'spent', charge) end
  end
  redis.call('HDEL', record, 'budget_keys', 'reserved')
  return reserved
end
"""

# KEYS: the tenant's definitions, the request's record. ARGV: prefix, key id, session
# id, amount, day id, month id. (The start script composes the function instead.)
RESERVE_SCRIPT = FUNCTIONS + "return budget_reserve(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6])\n"

# KEYS: the tenant's definitions. ARGV: prefix, key id, session id, day id, month id.
# The most used share of the budgets that apply, in millionths (0: none applies).
SHARE_SCRIPT = (
    FUNCTIONS
    + """
local most = 0
for _, target in ipairs(budget_targets(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])) do
  local spend = redis.call('HMGET', target.key, 'spent', 'reserved')
  local used = tonumber(spend[1] or '0') + tonumber(spend[2] or '0')
  local share = 1000000
  if target.limit > 0 then share = math.floor(used * 1000000 / target.limit) end
  if share > most then most = share end
end
return most
"""
)

# KEYS: the request's record. ARGV: the new amount.
# {'ok'} | {'over', id, scope, remaining, period, limit} (the reservation is left as it was).
CORRECT_SCRIPT = (
    FUNCTIONS
    + """
local noted = redis.call('HMGET', KEYS[1], 'budget_keys', 'reserved')
if not noted[1] or noted[1] == '' then return {'ok'} end
local old, amount = tonumber(noted[2]), tonumber(ARGV[1])
for key in string.gmatch(noted[1], '%S+') do
  local spend = redis.call('HMGET', key, 'spent', 'reserved', 'limit', 'id', 'period', 'scope')
  -- A key Redis lost since the reservation has no limit to check against: the next
  -- reservation of its budget brings the limit back.
  if spend[3] then
    local used = tonumber(spend[1] or '0') + tonumber(spend[2] or '0') - old
    if used + amount > tonumber(spend[3]) then
      return budget_over({id = spend[4], scope = spend[6], period = spend[5], limit = tonumber(spend[3])}, used, amount)
    end
  end
end
for key in string.gmatch(noted[1], '%S+') do
  budget_unreserve(key, old)
  redis.call('HINCRBY', key, 'reserved', amount)
end
redis.call('HSET', KEYS[1], 'reserved', amount)
return {'ok'}
"""
)

# KEYS: the request's record. ARGV: the charge (nano-USD). Returns what was reserved.
SETTLE_SCRIPT = FUNCTIONS + "return budget_settle(KEYS[1], tonumber(ARGV[1]))\n"

# KEYS: the request's record. A failed request's reservation: refunded when no token
# reached its stream, else charged in full (what the provider billed is unknown, and
# a budget is never to be overshot). Returns {reserved, charged}.
RELEASE_SCRIPT = (
    FUNCTIONS
    + """
local streamed = redis.call('HGET', KEYS[1], 'streamed') == '1'
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
local charge = 0
if streamed then charge = reserved end
budget_settle(KEYS[1], charge)
return {reserved, charge}
"""
)

# KEYS: the tenant's definitions, then the spend key of each budget's current period.
# ARGV: 'publish' (replace the definitions) or 'rebuild' (write them only while they
# are missing: the first process that rebuilds them wins), the number of definitions,
# their fields and values, then each spend key's spend so far (from the ledger),
# written only where the key does not exist: a budget new in its period, or a Redis
# that lost its data.
WRITE_DEFINITIONS_SCRIPT = """
if ARGV[1] == 'rebuild' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[1])
local fields = {'loaded', '1'}
local n = tonumber(ARGV[2])
for i = 3, 2 + 2 * n do table.insert(fields, ARGV[i]) end
redis.call('HSET', KEYS[1], unpack(fields))
for i = 2, #KEYS do redis.call('HSETNX', KEYS[i], 'spent', ARGV[2 + 2 * n + i - 1]) end
return 1
"""


@dataclass(frozen=True)
class Over:
    """The budget that cannot take a request, and what it has left (nano-USD)."""

    budget_id: int
    scope: Scope
    remaining_nano: int
    period: Period
    limit_nano: int

    @classmethod
    def from_reply(cls, reply: list[Any]) -> Over:
        return cls(int(_text(reply[1])), Scope(_text(reply[2])), int(reply[3]), Period(_text(reply[4])), int(reply[5]))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Reserved:
    """A reservation's outcome: how many budgets took it, or the one that could not
    (``over``); ``known`` False: the tenant's definitions are not in Redis."""

    known: bool = True
    budgets: int = 0
    over: Over | None = None

    @classmethod
    def from_reply(cls, reply: list[Any]) -> Reserved:
        kind = _text(reply[0])
        if kind == "unknown":
            return cls(known=False)
        if kind == "over":
            return cls(over=Over.from_reply(reply))
        return cls(budgets=int(reply[1]))


class BudgetStore:
    """The scripts above on one Redis, under one prefix. Each step is one round trip
    (``redis_errors`` maps a failure to ``ServiceUnavailable``)."""

    def __init__(self, client: redis.Redis, *, prefix: str) -> None:
        self._client = client
        self.prefix = prefix
        self._reserve: Any = client.register_script(RESERVE_SCRIPT)
        self._correct: Any = client.register_script(CORRECT_SCRIPT)
        self._settle: Any = client.register_script(SETTLE_SCRIPT)
        self._release: Any = client.register_script(RELEASE_SCRIPT)

    def reserve(self, *, tenant_id: str, record_key: str, api_key_id: int | None, session_id: str, amount: int, now: float) -> Reserved:
        keys = [definitions_key(self.prefix, tenant_id), record_key]
        args = [self.prefix, "" if api_key_id is None else api_key_id, session_id, amount, *period_ids(now)]
        with redis_errors("reserve the budgets"):
            return Reserved.from_reply(self._reserve(keys=keys, args=args))

    def correct(self, record_key: str, amount: int) -> Over | None:
        """The reservation changed to ``amount``, or the budget that cannot take it (the
        reservation then stays as it was)."""
        with redis_errors("correct the budget reservation"):
            reply = self._correct(keys=[record_key], args=[amount])
        return Over.from_reply(reply) if _text(reply[0]) == "over" else None

    def settle(self, record_key: str, charge: int) -> int:
        """The reservation ended, ``charge`` spent; what had been reserved (0: none)."""
        with redis_errors("settle the budgets"):
            return int(self._settle(keys=[record_key], args=[charge]))

    def queue_settle(self, pipe: Any, record_key: str, charge: int) -> None:
        """``settle`` as a command of ``pipe`` (a run's bookkeeping pipeline)."""
        self._settle(keys=[record_key], args=[charge], client=pipe)

    def release(self, record_key: str) -> int:
        """A failed request's reservation (``RELEASE_SCRIPT``); what it was charged."""
        with redis_errors("release the budget reservation"):
            _reserved, charged = self._release(keys=[record_key])
        return int(charged)

    def spends(self, budgets: list[tuple[int, Period]], now: float) -> list[tuple[int, int] | None]:
        """``spend`` of each (id, period), in one round trip."""
        day_id, month_id = period_ids(now)
        with redis_errors("read the budgets"):
            pipe = self._client.pipeline(transaction=False)
            for budget_id, period in budgets:
                pipe.hmget(spend_key(self.prefix, budget_id, {Period.DAY: day_id, Period.MONTH: month_id}.get(period, "total")), "spent", "reserved")
            replies = pipe.execute()
        return [None if spent is None and reserved is None else (int(spent or 0), int(reserved or 0)) for spent, reserved in replies]

    def spend(self, budget_id: int, period: Period, now: float) -> tuple[int, int] | None:
        """(spent, reserved) of the budget's current period; None: Redis has no figures."""
        day_id, month_id = period_ids(now)
        key = spend_key(self.prefix, budget_id, {Period.DAY: day_id, Period.MONTH: month_id}.get(period, "total"))
        with redis_errors("read the budgets"):
            spent, reserved = self._client.hmget(key, "spent", "reserved")
        if spent is None and reserved is None:
            return None
        return int(spent or 0), int(reserved or 0)
