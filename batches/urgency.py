"""Which batch work runs first: ``high`` strictly before ``default`` and ``low``, the
earliest deadline first within a priority, and a job near its deadline
(``batch.deadline_near_s``) before any other.

The queues give the first part: a batch worker consumes ``batch.high``, then
``batch.default``, then ``batch.low`` (kombu's ``priority`` queue order on the
Redis transport). What the queues cannot do, a chunk already running or already
queued does: before each item it asks whether a more urgent job waits, and if so
it runs that job's free items first (any of them, claimed as its own chunks claim
them), then its own: every thread of every batch worker turns to the urgent job
within an item, and nobody spins re-queueing messages.

Each active job with items left has an entry in two Redis sorted sets beside the
broker's queues: ``<prefix>:batch:urgency``, scored by its priority's rank and its
deadline (``score``), and ``<prefix>:batch:deadlines``, by its deadline alone. One
script answers "who is more urgent than me" in one round trip. The answer is
checked in Postgres before anyone yields: the urgent job must be active with an
item nobody holds. An entry whose job is not active is removed then, so a stale
entry (a job finished by a process that died before removing it) never stalls the
others; one whose items are all being run keeps nobody from their own.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
import weakref
from typing import Any

import structlog
from django.db.models import Q
from django.utils import timezone

from batches.models import BatchItem, BatchJob
from orchestrator_site.errors import ServiceUnavailable
from pipeline.shared_redis import SharedRedis, get_redis, redis_errors

log = structlog.get_logger("batches")

RANK = {BatchJob.Priority.HIGH: 1, BatchJob.Priority.DEFAULT: 2, BatchJob.Priority.LOW: 3}
RANK_SPAN = 10_000_000_000  # more seconds than any epoch deadline has (until 2286)
NO_DEADLINE = RANK_SPAN - 1

# KEYS: urgency, deadlines. ARGV: this job's id, its score, whether it is near its
# deadline (1/0), the end of "near" (epoch seconds), its deadline (epoch seconds, 0:
# none). The id of a job more urgent than this one, or nothing: for a job near its
# deadline, one with an earlier deadline; for any other, a job near its deadline, else
# the one with the lowest score if lower than this one's. GONE when this job has no
# entry (it left: cancelled or ended, or Redis lost it).
GONE = "-"
MORE_URGENT = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return '-' end
if ARGV[3] == '1' then
  local earlier = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[5], 'LIMIT', 0, 1)
  if earlier[1] and earlier[1] ~= ARGV[1] then return earlier[1] end
  return false
end
local near = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[4], 'LIMIT', 0, 2)
for _, id in ipairs(near) do
  if id ~= ARGV[1] then return id end
end
local top = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if top[1] and top[1] ~= ARGV[1] and tonumber(top[2]) < tonumber(ARGV[2]) then return top[1] end
return false
"""


_scripts: weakref.WeakKeyDictionary[SharedRedis, Any] = weakref.WeakKeyDictionary()


def _more_urgent_script(shared: SharedRedis) -> Any:
    found = _scripts.get(shared)
    if found is None:
        found = _scripts[shared] = shared.client.register_script(MORE_URGENT)
    return found


def score(priority: str, deadline: dt.datetime | None) -> float:
    """Lower runs first: the priority's rank, then the deadline (none: last)."""
    return RANK.get(BatchJob.Priority(priority), RANK[BatchJob.Priority.LOW]) * RANK_SPAN + (deadline.timestamp() if deadline else NO_DEADLINE)


def _keys() -> tuple[str, str]:
    shared = get_redis()
    return shared.key("batch", "urgency"), shared.key("batch", "deadlines")


def enter(job: BatchJob) -> None:
    """``job`` has items to run. Redis down: it runs, without preempting anyone."""
    urgency, deadlines = _keys()
    try:
        with redis_errors("note the batch job's urgency"):
            pipe = get_redis().client.pipeline(transaction=False)
            pipe.zadd(urgency, {str(job.pk): score(job.priority, job.deadline)})
            if job.deadline is not None:
                pipe.zadd(deadlines, {str(job.pk): job.deadline.timestamp()})
            pipe.execute()
    except ServiceUnavailable as exc:
        log.warning("batch_urgency_unrecorded", job_id=str(job.pk), outcome="degraded", error_type=type(exc.__cause__ or exc).__name__)


def leave(job_id: object) -> None:
    """The job has nothing left to run (finished, cancelled, expired, deleted)."""
    urgency, deadlines = _keys()
    try:
        with redis_errors("forget the batch job's urgency"):
            pipe = get_redis().client.pipeline(transaction=False)
            pipe.zrem(urgency, str(job_id))
            pipe.zrem(deadlines, str(job_id))
            pipe.execute()
    except ServiceUnavailable as exc:
        log.warning("batch_urgency_unrecorded", job_id=str(job_id), outcome="degraded", error_type=type(exc.__cause__ or exc).__name__)


def is_near(job: BatchJob, near_s: float, now: float | None = None) -> bool:
    return job.deadline is not None and job.deadline.timestamp() <= (time.time() if now is None else now) + near_s


def more_urgent(job: BatchJob, near_s: float, *, now: float | None = None) -> str | None:
    """The id of a job that should run before ``job``'s next item, per Redis (one round
    trip); None when there is none, or Redis cannot say."""
    now = time.time() if now is None else now
    shared = get_redis()
    try:
        with redis_errors("read the batch jobs' urgency"):
            args = [
                str(job.pk),
                score(job.priority, job.deadline),
                int(is_near(job, near_s, now)),
                now + near_s,
                job.deadline.timestamp() if job.deadline else 0,
            ]
            found = _more_urgent_script(shared)(keys=list(_keys()), args=args)
    except ServiceUnavailable:
        return None
    return found.decode() if isinstance(found, bytes) else found


def waits(job_id: str) -> bool:
    """Whether ``job_id`` is active with an item nobody holds (Postgres). An entry of a
    job that is not active is removed."""
    now = timezone.now()
    try:
        pk = uuid.UUID(job_id)
    except ValueError:
        pk = None  # not a job's: nobody waits behind it
    if pk is None or not BatchJob.objects.filter(pk=pk, status__in=BatchJob.ACTIVE).exists():
        leave(job_id)
        return False
    free = BatchItem.objects.filter(job_id=pk, status=BatchItem.Status.PENDING).filter(Q(leased_until__isnull=True) | Q(leased_until__lt=now))
    return free.exists()


class Preemption:
    """A chunk run's question before each item: is a more urgent job waiting? Asked of
    Redis each time. An urgent job whose items are all being run (Postgres says) is not
    asked about again for ``RECHECK_S``, so a long urgent job costs the chunks waiting
    on it one query per quarter second, not one per item; one whose provider is down,
    for as long as its retry waits (``pause``)."""

    RECHECK_S = 0.25

    def __init__(self, job: BatchJob, near_s: float) -> None:
        self.job = job
        self.near_s = near_s
        self.gone = False
        self._quiet_until: dict[str, float] = {}

    def urgent(self) -> str | None:
        """The job whose free items should run before this run's next one, if any.
        Sets ``gone`` when Redis no longer has this run's job (see ``GONE``)."""
        found = more_urgent(self.job, self.near_s)
        self.gone = found == GONE
        if found is None or self.gone or self._quiet_until.get(found, 0.0) > time.monotonic():
            return None
        if waits(found):
            return found
        self.pause(found, self.RECHECK_S)
        return None

    def pause(self, job_id: str, seconds: float) -> None:
        self._quiet_until[job_id] = time.monotonic() + seconds
