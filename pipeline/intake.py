"""A real-time request's start on the gateway's event loop (``services.ainfer_start``).

``services.infer_start`` makes the same decision synchronously: a deduplication
claim, the rate limit, admission and the status hash (a Redis round trip each),
then Celery's publish, all in a thread of its own. Here the four Redis steps are
one Lua script, composed of the very functions their own scripts run, so it is
also atomic: a request refused by a limit leaves no claim behind. The task's
broker message is built from a template that Celery itself published once, to an
in-memory broker. When the broker is the token bus's Redis server (the default:
another database of it), the script pushes the message too, so that the request's
whole start is one round trip; otherwise the message is one ``LPUSH`` on the loop's
own connection to the broker, a second round trip. Either way no thread hop, and
none of kombu's per-message cost (kombu builds a new client object for every publish).

The message path is used only when the broker is Redis and nothing listens to
Celery's publish signals. The OpenTelemetry instrumentation does listen: it puts
the trace context in the message's headers, so with tracing on the message goes
through Celery's own publish, in a thread. Redis being down is the caller's to
handle (``ServiceUnavailable`` from ``start``, ``redis.RedisError`` from
``publish``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from celery import signals
from kombu import Connection
from redis.connection import parse_url

from pipeline.resilience import admission, dedup, ratelimit
from pipeline.tokenbus import TokenBus, one_async_retry, redis_errors
from pipeline.types import PromptRequest

# KEYS: 1 dedup in-flight key, 2 dedup done key, 3 rate requests log, 4 rate tokens log,
#       5 global leases, 6 tenant leases, 7 status hash, 8 the broker's list.
# ARGV: 1 request_id, 2 dedup window_s (0: no deduplication), 3 now, 4 rate window_s,
#       5 rpm, 6 tpm (both 0: no rate limit, not even counted), 7 lease_s, 8 global max,
#       9 tenant max, 10 tenant_id, 11 session_id, 12 status ttl_s, 13 now as recorded,
#       14 the task's message ("": the caller pushes it), 15 the broker's database
#       ("": the bus's own; a script's SELECT stays in the script from Redis 7.0 on).
# Returns {"done", result} | {"inflight", owner} | {"rate", kind, retry_after_ms} |
# {"shed", 0 (global) or -1 (tenant)} | {"queued", request_id, 1 if the message was pushed}.
START_SCRIPT = (
    dedup.CLAIM_FUNCTION
    + ratelimit.CHECK_FUNCTION
    + admission.ACQUIRE_FUNCTION
    + """
local request_id, window_s, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if window_s > 0 then
  local claim = dedup_claim(KEYS[1], KEYS[2], request_id, window_s)
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
redis.call('HSET', KEYS[7], 'tenant_id', ARGV[10], 'session_id', ARGV[11], 'status', 'queued', 'created_at', ARGV[13], 'updated_at', ARGV[13])
redis.call('EXPIRE', KEYS[7], ARGV[12])
if ARGV[14] == '' then return {'queued', request_id, 0} end
if ARGV[15] ~= '' then
  local selected = redis.pcall('SELECT', ARGV[15])
  if type(selected) == 'table' and selected.err then return {'queued', request_id, 0} end
end
redis.call('LPUSH', KEYS[8], ARGV[14])
return {'queued', request_id, 1}
"""
)


@dataclass(frozen=True)
class Limits:
    """What the script checks a request against (``services`` derives them from the config)."""

    dedup_window_s: int  # 0: no deduplication
    requests_per_minute: int  # 0: none
    tokens_per_minute: int  # 0: none
    max_global: int
    max_per_tenant: int
    lease_s: float


@dataclass(frozen=True)
class Outcome:
    """``kind``: "done" (``value`` is the result's JSON), "inflight" (``value`` is the
    owner's request id), "rate" (``value`` names the limit), "shed" (``value`` is the
    scope: "global" or "tenant") or "queued"."""

    kind: str
    value: str = ""
    retry_after_s: float = 0.0
    pushed: bool = False  # "queued" with the task's message on the broker's list already


class Intake:
    """The start script on the token bus's Redis, and ``run_realtime``'s messages
    pushed straight onto the broker's list (``BrokerQueue``)."""

    def __init__(self, broker: BrokerQueue | None) -> None:
        self.broker = broker
        self._scripts: weakref.WeakKeyDictionary[aioredis.Redis, Any] = weakref.WeakKeyDictionary()

    @property
    def publishes(self) -> bool:
        """Whether ``publish`` may be used for the next message (else: Celery's publish)."""
        return self.broker is not None and not (signals.before_task_publish.receivers or signals.after_task_publish.receivers)

    async def start(self, bus: TokenBus, request: PromptRequest, *, dedup_key: str | None, limits: Limits, now: float, argsrepr: str | None = None) -> Outcome:
        """Claim, count, admit and record the request as queued, or say why not (one
        round trip). With ``argsrepr``, the task's message goes with the script when the
        script can reach the broker's list (``BrokerQueue.database_from``), pushed once
        the request is queued (``Outcome.pushed``)."""
        database, message = None, ""
        if self.broker is not None and argsrepr is not None:
            database = await self.broker.database_from(bus)
            if database is not None:
                message = self.broker.messages.encode(request, argsrepr)
        client = bus.aclient()
        script = self._scripts.get(client)
        if script is None:
            script = self._scripts[client] = client.register_script(START_SCRIPT)
        inflight, done, _ = dedup.keys(bus.prefix, dedup_key or "")
        keys = [
            inflight,
            done,
            *ratelimit.keys(bus.prefix, request.tenant_id),
            *admission.keys(bus.prefix, request.tenant_id),
            bus.status_key(request.request_id),
            self.broker.key if self.broker is not None else "",
        ]
        args: list[str | int | float] = [
            request.request_id,
            limits.dedup_window_s if dedup_key else 0,
            now,
            ratelimit.WINDOW_S,
            limits.requests_per_minute,
            limits.tokens_per_minute,
            limits.lease_s,
            limits.max_global,
            limits.max_per_tenant,
            request.tenant_id,
            request.session_id,
            bus.ttl_s,
            f"{now:.6f}",
            message,
            database or "",
        ]
        with redis_errors("start the request"):
            reply = await script(keys=keys, args=args)
        kind = str(reply[0])
        if kind == "rate":
            return Outcome("rate", str(reply[1]), max(int(reply[2]), 0) / 1000.0)
        if kind == "shed":
            return Outcome("shed", "tenant" if int(reply[1]) == -1 else "global")
        return Outcome(kind, str(reply[1]), pushed=kind == "queued" and int(reply[2]) == 1)

    async def publish(self, request: PromptRequest, argsrepr: str) -> None:
        """``run_realtime``'s message for the request, onto the broker's list."""
        if self.broker is None:
            raise RuntimeError("no broker queue: check Intake.publishes first")
        await self.broker.push(self.broker.messages.encode(request, argsrepr))


class TaskMessages:
    """``run_realtime``'s broker messages: kombu's JSON envelope for the Redis
    transport, Celery's task message protocol 2 inside. Everything but the request
    and its ids comes from the template, a message Celery published itself."""

    # The fields of a Celery message that carry its task id (or its delivery's).
    ID_FIELDS = (("headers", "id"), ("headers", "root_id"), ("properties", "correlation_id"), ("properties", "delivery_tag"))

    def __init__(self, template: dict[str, Any]) -> None:
        self.template = template
        _args, _kwargs, self._embed = json.loads(base64.b64decode(template["body"]))
        self._headers = dict(template["headers"])
        self._properties = dict(template["properties"])

    @classmethod
    def from_celery(cls, enqueue: Callable[..., None], queue: str) -> TaskMessages:
        """Celery publishes one message (``enqueue(request, connection=…)``) to an in-memory broker: the template."""
        with _template_lock, Connection("memory://") as conn:
            enqueue(_TEMPLATE_REQUEST, connection=conn)
            channel: Any = conn.default_channel  # a virtual transport's channel: it has basic_get
            message = channel.basic_get(queue, no_ack=True)
            if message is None:
                raise RuntimeError(f"Celery put no message on {queue!r}")
            return cls(message.serializable())

    @property
    def queue(self) -> str | None:
        """The list the Redis transport puts the message on, if this path can publish it:
        to a queue (the default exchange) at the default priority."""
        properties = self.template["properties"]
        info = properties.get("delivery_info") or {}
        if info.get("exchange") or properties.get("priority"):
            return None
        return str(info.get("routing_key") or "") or None

    def encode(self, request: PromptRequest, argsrepr: str) -> str:
        task_id = str(uuid.uuid4())
        body = json.dumps([[request.to_dict()], {}, self._embed])
        headers = {**self._headers, "id": task_id, "root_id": task_id, "argsrepr": argsrepr}
        properties = {**self._properties, "correlation_id": task_id, "delivery_tag": str(uuid.uuid4()), "argsrepr": argsrepr}
        return json.dumps({**self.template, "body": base64.b64encode(body.encode()).decode("ascii"), "headers": headers, "properties": properties})


def one_redis_server(url: str) -> bool:
    """Whether a broker URL names one Redis server (not a failover list, Sentinel or a socket path)."""
    return urlsplit(url).scheme in BrokerQueue.SCHEMES and ";" not in url


def selects_within_scripts(version: str) -> bool:
    """Whether a script's SELECT stays in the script on a server of this version (7.0
    and later); before, it changed the database of the connection that ran the script."""
    major = version.split(".", 1)[0]
    return major.isdigit() and int(major) >= 7


_template_lock = threading.Lock()
_TEMPLATE_REQUEST = PromptRequest(
    request_id="template", tenant_id="template", session_id="template", prompt="template", worker="template", model="template", max_tokens=1
)


class BrokerQueue:
    """The broker's list for ``messages``, on a Redis connection per event loop."""

    SCHEMES = frozenset({"redis", "rediss"})

    def __init__(self, *, url: str, key: str, messages: TaskMessages, socket_timeout_s: float) -> None:
        self.url = url
        self.key = key
        self.messages = messages
        self._socket_timeout_s = socket_timeout_s
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = weakref.WeakKeyDictionary()
        self._databases: dict[str, str | None] = {}

    async def database_from(self, bus: TokenBus) -> str | None:
        """How a script on the bus's connection reaches this list: "" (the same
        database), the database's number (another database of the same server, which
        runs Redis 7.0 or later), or None (another server: the list is pushed to
        on its own connection). Asked once per bus address."""
        if bus.url not in self._databases:
            self._databases[bus.url] = await self._database_from(bus)
        return self._databases[bus.url]

    async def _database_from(self, bus: TokenBus) -> str | None:
        ours, theirs = parse_url(self.url), parse_url(bus.url)
        database = int(ours.pop("db", 0))
        if ours != {k: v for k, v in theirs.items() if k != "db"}:
            return None
        if database == int(theirs.get("db", 0)):
            return ""
        with redis_errors("read the server's version"):
            try:
                info = await bus.aclient().info("server")
            except redis.ResponseError:  # INFO refused (an ACL, a proxy): the list is pushed to apart
                return None
        return str(database) if selects_within_scripts(str(info.get("redis_version", ""))) else None

    @classmethod
    def for_broker(cls, url: str, options: Mapping[str, Any], messages: TaskMessages) -> BrokerQueue | None:
        """None unless the broker (Celery's ``broker_url`` and ``broker_transport_options``)
        is one Redis server (not a failover list, Sentinel or a socket path) and the
        message goes to a list of its own (``TaskMessages.queue``)."""
        queue = messages.queue
        if not one_redis_server(url) or queue is None:
            return None
        return cls(url=url, key=f"{options.get('global_keyprefix', '')}{queue}", messages=messages, socket_timeout_s=float(options.get("socket_timeout", 5)))

    def client(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = aioredis.Redis.from_url(
                self.url, socket_timeout=self._socket_timeout_s, socket_connect_timeout=self._socket_timeout_s, retry=one_async_retry()
            )
            self._clients[loop] = client
        return client

    async def push(self, payload: str) -> None:
        await self.client().lpush(self.key, payload)
