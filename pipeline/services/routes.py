"""A request that names a route group (``routing.choose_in_group``): what the choice
reads, and where it comes from.

- Each worker's recent TTFT, the last ``TTFT_WINDOW`` answers' in a Redis list per
  worker, pushed by the runs that answered (in their settle's round trip); which
  circuits are open; which providers are rate limiting us (a key with the provider's
  ``Retry-After`` as its TTL, set by the run that was told). This process reads all
  of it every ``REFRESH_S`` in a thread of its own (``RouteBoard``): no request waits.
- The budget share, the request's own: one script, one round trip, for requests that
  name a group only.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from typing import Any

import structlog

from orchestrator_site.errors import ServiceUnavailable
from pipeline import metrics
from pipeline.config import PipelineSettings, get_config
from pipeline.resilience import budget
from pipeline.resilience.breaker import BreakerState, read_states
from pipeline.routing import Route, RouteInputs, choose_in_group, looks_like_code, names_a_group
from pipeline.shared_redis import get_redis, redis_errors

log = structlog.get_logger("pipeline.services")

TTFT_WINDOW = 200  # answers per worker the P95 is taken over
REFRESH_S = 1.0


def ttft_key(prefix: str, worker: str) -> str:
    return f"{prefix}:ttft:{worker}"


def limited_key(prefix: str, worker: str) -> str:
    return f"{prefix}:limited:{worker}"


def queue_ttft(pipe: Any, prefix: str, worker: str, ttft_s: float) -> None:
    """An answer's time to first token, into its worker's window (a command of ``pipe``)."""
    key = ttft_key(prefix, worker)
    pipe.lpush(key, f"{ttft_s * 1000:.1f}")
    pipe.ltrim(key, 0, TTFT_WINDOW - 1)


def provider_limiting(worker: str, retry_after_s: float | None) -> None:
    """The worker's provider answered 429: its route groups pass it over until its
    ``Retry-After`` (5 s without one). Redis down: nothing is kept."""
    shared = get_redis()
    try:
        with redis_errors("note the provider's rate limit"):
            shared.client.set(limited_key(shared.prefix, worker), "1", px=max(1, round((retry_after_s or 5.0) * 1000)))
    except ServiceUnavailable as exc:
        log.warning("provider_limit_unrecorded", worker=worker, outcome="degraded", error_type=type(exc.__cause__ or exc).__name__)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


class RouteBoard:
    """The platform as this process last read it, for route groups."""

    def __init__(self, refresh_s: float = REFRESH_S) -> None:
        self.refresh_s = refresh_s
        self.ttft_p95_ms: Mapping[str, float] = {}
        self.unavailable: frozenset[str] = frozenset()
        self.read_at = 0.0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def refresh(self, config: PipelineSettings | None = None) -> None:
        config = config or get_config()
        shared = get_redis()
        workers = sorted(config.workers)
        with redis_errors("read the route board"):
            pipe = shared.client.pipeline(transaction=False)
            for worker in workers:
                pipe.lrange(ttft_key(shared.prefix, worker), 0, -1)
                pipe.exists(limited_key(shared.prefix, worker))
            replies = pipe.execute()
            states = read_states(shared.client, prefix=shared.prefix, workers=workers)
        ttft = {w: p95([float(v) for v in replies[2 * n]]) for n, w in enumerate(workers) if replies[2 * n]}
        limited = {w for n, w in enumerate(workers) if replies[2 * n + 1]}
        opened = {w for w, state in states.items() if state is BreakerState.OPEN}
        self.ttft_p95_ms, self.unavailable, self.read_at = ttft, frozenset(limited | opened), time.monotonic()

    def following(self) -> RouteBoard:
        """This board, its refresher thread started (once per process)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="route-board", daemon=True)
                self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self.refresh()
            except ServiceUnavailable as exc:
                log.warning("route_board_unread", outcome="degraded", error_type=type(exc.__cause__ or exc).__name__)
            time.sleep(self.refresh_s)


board = RouteBoard()


async def abudget_share(*, tenant_id: str, api_key_id: int | None, session_id: str) -> float:
    """The most used share of the budgets that apply to a request (0 when none does, or
    Redis cannot say: the other rules then choose)."""
    shared = get_redis()
    day_id, month_id = budget.period_ids(time.time())
    key = budget.definitions_key(shared.prefix, tenant_id)
    args = [shared.prefix, "" if api_key_id is None else api_key_id, session_id, day_id, month_id]
    try:
        with redis_errors("read the budgets' share"):
            millionths = await shared.aclient().eval(budget.SHARE_SCRIPT, 1, key, *args)
    except ServiceUnavailable:
        return 0.0
    return int(millionths) / 1_000_000


async def aroute_if_grouped(config: PipelineSettings, data: Mapping[str, Any], *, tenant_id: str, api_key_id: int | None) -> Route | None:
    """The route of a request that names a route group (None: it names none)."""
    group = names_a_group(config, worker=data.get("worker"), model=data.get("model"))
    return None if group is None else await aroute(config, group, data, tenant_id=tenant_id, api_key_id=api_key_id)


async def aroute(config: PipelineSettings, group: str, data: Mapping[str, Any], *, tenant_id: str, api_key_id: int | None) -> Route:
    """The route of a request naming ``group``, and the decision counted."""
    prompt = str(data.get("prompt") or "")
    session_id = str(data.get("session_id") or "")
    share = await abudget_share(tenant_id=tenant_id, api_key_id=api_key_id, session_id=session_id)
    view = board.following()
    latency = data.get("latency_budget_ms")
    inputs = RouteInputs(
        prompt_chars=len(prompt),
        has_code=looks_like_code(prompt),
        latency_budget_ms=float(latency) if latency is not None else None,
        budget_share=share,
        ttft_p95_ms=view.ttft_p95_ms,
        unavailable=view.unavailable,
    )
    route = choose_in_group(config, group, inputs)
    metrics.child(metrics.ROUTE_DECISIONS, group, route.worker, route.reason).inc()
    return route
