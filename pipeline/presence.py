"""Tenants known to have no documents: their real-time requests skip the RAG search.

A search for a tenant with no documents finds nothing, and its Postgres round trip
was the longest step of a real-time task's start: ~1 ms at P50 at concurrency 1,
of the ~1.3 ms the start took with its Redis script running beside it. A worker
process that knows the tenant has none does not send it. What it knows is checked
against Redis in the round trip the task's start makes anyway, so a document added
is never missed:

- Each tenant's documents have a **generation** in Redis (``<prefix>:docs:<tenant>``).
  It changes after every commit that adds a document (``documents_changed``, sent
  by ``Document``'s ``post_save``; a bulk write calls it itself). A missing
  generation (a new tenant, a flushed Redis) is created with a random value.
- Every real-time task's start script reads the generation
  (``CircuitBreaker.begin_and_allow``), and the process keeps the latest it read.
- A search run beside the start asks Postgres, in the same round trip, whether
  the tenant has any document. When it has none, the process keeps the generation
  it had read *before sending that search* (``EmptyTenants.latest``): no document
  committed since was seen, and any document committed since changes that
  generation after its commit.
- A later task of that tenant sends no search. If its start reads the kept
  generation, no document has been added since one was seen not to exist: the
  stage gets an empty result. If it reads another, the stage searches.

So a document whose creation has returned (committed, and its generation changed)
is searched by every task that starts after it. If the generation cannot be
changed (Redis down after the commit), what this process knows is trusted for
``trust_s`` at most; ``documents_changed`` logs the miss.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable
from typing import Any

import redis
import structlog
from django.db import transaction

from pipeline.tokenbus import TokenBus, get_bus

log = structlog.get_logger("pipeline.presence")

# KEYS: the generation. ARGV: a random start, for a generation that does not exist yet.
_CHANGE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('INCR', KEYS[1]) end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""


def generation_key(bus: TokenBus, tenant_id: str) -> str:
    return f"{bus.prefix}:docs:{tenant_id}"


def new_generation() -> str:
    """A random start (52 bits): a generation created again, after Redis lost it, is not
    the one a process kept, but for a chance of one in 2**52. Made for every real-time
    task's start (used only when the generation is missing): the process's own
    generator, reseeded in a forked child, not a system call each time."""
    return str(random.getrandbits(52) + 1)


def documents_changed(tenant_id: str, *, bus: TokenBus | None = None) -> None:
    """After a commit that added documents of ``tenant_id``: every process's knowledge
    that the tenant had none is void from here on."""
    bus = bus or get_bus()
    try:
        bus.client.register_script(_CHANGE)(keys=[generation_key(bus, tenant_id)], args=[new_generation()])
    except redis.RedisError as exc:
        # The document is stored; processes that knew the tenant empty may not search
        # for it until their knowledge expires (EmptyTenants.trust_s).
        log.warning("documents_change_unrecorded", tenant_id=tenant_id, outcome="error", error_type=type(exc).__name__)


def document_saved(sender: type, instance: Any, created: bool, using: str | None = None, **_: Any) -> None:
    """``Document``'s ``post_save``: a document added changes its tenant's generation
    once its transaction commits (at once outside one)."""
    if created:
        transaction.on_commit(functools.partial(documents_changed, str(instance.tenant_id)), using=using)


class EmptyTenants:
    """What one process knows: the latest generation its tasks' starts read for each
    tenant, and the tenants it saw with no documents at a generation. Shared by the
    process's threads (each operation is one dict operation under the GIL)."""

    def __init__(self, *, trust_s: float = 60.0, size: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.trust_s, self.size, self._clock = trust_s, size, clock
        self._read: dict[str, str] = {}
        self._empty: dict[str, tuple[str, float]] = {}

    def read(self, tenant_id: str, generation: str) -> None:
        """A task's start read ``generation``. A slower thread may store an older one
        after a newer: either was read before any search sent after this call."""
        self._put(self._read, tenant_id, generation)

    def latest(self, tenant_id: str) -> str | None:
        return self._read.get(tenant_id)

    def learned(self, tenant_id: str, generation: str) -> None:
        """A search sent after ``generation`` was read found the tenant with no document."""
        self._put(self._empty, tenant_id, (generation, self._clock()))

    def _put(self, known: dict[str, Any], tenant_id: str, value: Any) -> None:
        if len(known) >= self.size and tenant_id not in known:
            known.clear()  # bounded: forgetting only costs a search
        known[tenant_id] = value

    def empty_at(self, tenant_id: str) -> str | None:
        """The generation at which the tenant had no documents, if known and still trusted."""
        known = self._empty.get(tenant_id)
        if known is None:
            return None
        generation, since = known
        if self._clock() - since > self.trust_s:
            self.forget(tenant_id)
            return None
        return generation

    def forget(self, tenant_id: str) -> None:
        self._empty.pop(tenant_id, None)


empty_tenants = EmptyTenants()
