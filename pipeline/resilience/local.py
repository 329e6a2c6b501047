"""Per-process stand-ins for the shared state in Redis, used while Redis is down.

Rate limits, admission, deduplication and circuit breakers live in Redis so that
every process agrees. When Redis stops answering, each process falls back to
its own copy of the same rules (``LocalRateLimiter``, ``LocalAdmission``,
``LocalDedup``, ``LocalBreaker``), logs a warning and sets the
``orchestrator_degraded{component="redis"}`` gauge; it tries Redis again every
``retry_s`` and goes back to the shared state as soon as it answers.

What per-process state cannot do, and is therefore looser during an outage:
a tenant's limit holds per process (N gateway processes may admit up to N
times the limit), and identical requests are deduplicated only within one
process and only once finished (no waiting on another's stream).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from orchestrator_site.errors import ServiceUnavailable
from pipeline import metrics
from pipeline.resilience.admission import Verdict
from pipeline.resilience.breaker import BreakerPolicy, BreakerState, Permission
from pipeline.resilience.ratelimit import RateVerdict, TenantRates

log = structlog.get_logger("pipeline.resilience")
T = TypeVar("T")


class SharedState:
    """Whether this process uses Redis for its shared state, or its own copy."""

    def __init__(self, *, retry_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_s = retry_s
        self._clock = clock
        self._down_until = 0.0
        self._degraded = False
        self._lock = threading.Lock()
        metrics.DEGRADED.labels("redis").set(0)

    @property
    def degraded(self) -> bool:
        return self._degraded

    def available(self) -> bool:
        """False while Redis failed less than ``retry_s`` ago: don't wait on it again."""
        return self._clock() >= self._down_until

    def failed(self, action: str, cause: BaseException | None = None) -> None:
        with self._lock:
            self._down_until = self._clock() + self.retry_s
            if self._degraded:
                return
            self._degraded = True
        metrics.DEGRADED.labels("redis").set(1)
        reason = f"{type(cause).__name__}: {cause}"[:200] if cause else None
        log.warning("shared_state_degraded", component="redis", action=action, outcome="degraded", retry_s=self.retry_s, reason=reason)

    def succeeded(self) -> None:
        if not self._degraded:
            return
        with self._lock:
            if not self._degraded:
                return
            self._degraded = False
        metrics.DEGRADED.labels("redis").set(0)
        log.warning("shared_state_restored", component="redis", outcome="ok")

    def reset(self) -> None:
        """Back to the shared state at once (tests, and operators via the shell)."""
        with self._lock:
            self._down_until = 0.0
        self.succeeded()

    def run(self, action: str, shared: Callable[[], T], local: Callable[[], T]) -> T:
        if not self.available():
            return local()
        try:
            result = shared()
        except ServiceUnavailable as exc:
            self.failed(action, exc.__cause__ or exc)
            return local()
        self.succeeded()
        return result


shared_state = SharedState()

# Methods that undo or release: applied to the local copy too, whichever side
# recorded the original (a slot taken during the outage is released after it).
_BOTH = frozenset({"release", "forget", "abandon"})


class WithFallback:
    """The shared object's methods, falling back to the local object's while Redis
    is down; its other attributes are the shared object's."""

    def __init__(self, shared: Any, local: Any, state: SharedState | None = None) -> None:
        self._shared = shared
        self._local = local
        self._state = state or shared_state

    def __getattr__(self, name: str) -> Any:
        shared_attr = getattr(self._shared, name)
        if not callable(shared_attr):
            return shared_attr
        local_attr = getattr(self._local, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if name in _BOTH:
                local_attr(*args, **kwargs)
            return self._state.run(name, lambda: shared_attr(*args, **kwargs), lambda: local_attr(*args, **kwargs))

        return call


class LocalRateLimiter:
    """``RateLimiter``'s sliding windows, in this process's memory."""

    def __init__(self, *, window_s: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self._clock = clock
        self._requests: dict[str, deque[tuple[float, str]]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def _trim(self, now: float, tenant_id: str) -> tuple[deque[tuple[float, str]], deque[tuple[float, int]]]:
        requests = self._requests.setdefault(tenant_id, deque())
        tokens = self._tokens.setdefault(tenant_id, deque())
        for log_ in (requests, tokens):
            while log_ and log_[0][0] <= now - self.window_s:
                log_.popleft()
        return requests, tokens

    def check(self, tenant_id: str, request_id: str, rates: TenantRates) -> RateVerdict:
        if not rates.requests_per_minute and not rates.tokens_per_minute:
            return RateVerdict(allowed=True)
        now = self._clock()
        with self._lock:
            requests, tokens = self._trim(now, tenant_id)
            if rates.requests_per_minute and len(requests) >= rates.requests_per_minute:
                return RateVerdict(False, "requests_per_minute", max(requests[0][0] + self.window_s - now, 0.0))
            if rates.tokens_per_minute and sum(n for _, n in tokens) >= rates.tokens_per_minute:
                return RateVerdict(False, "tokens_per_minute", max(tokens[0][0] + self.window_s - now, 0.0))
            requests.append((now, request_id))
        return RateVerdict(allowed=True)

    def forget(self, tenant_id: str, request_id: str) -> None:
        with self._lock:
            requests = self._requests.get(tenant_id)
            if requests:
                self._requests[tenant_id] = deque(entry for entry in requests if entry[1] != request_id)

    def record_tokens(self, tenant_id: str, request_id: str, tokens: int) -> None:
        if tokens > 0:
            with self._lock:
                self._tokens.setdefault(tenant_id, deque()).append((self._clock(), tokens))


class LocalAdmission:
    """``Admission``'s bounds on requests in flight, counted in this process."""

    def __init__(self, *, max_global: int, max_per_tenant: int, lease_s: float, clock: Callable[[], float] = time.time) -> None:
        self.max_global = max_global
        self.max_per_tenant = max_per_tenant
        self.lease_s = lease_s
        self._clock = clock
        self._held: dict[str, tuple[str, float]] = {}  # request id -> (tenant, admitted at)
        self._lock = threading.Lock()

    def configure(self, *, max_global: int, max_per_tenant: int, lease_s: float) -> LocalAdmission:
        self.max_global, self.max_per_tenant, self.lease_s = max_global, max_per_tenant, lease_s
        return self

    def acquire(self, tenant_id: str, request_id: str) -> Verdict:
        now = self._clock()
        with self._lock:
            self._held = {rid: held for rid, held in self._held.items() if held[1] > now - self.lease_s}
            if sum(1 for tenant, _ in self._held.values() if tenant == tenant_id) >= self.max_per_tenant:
                return Verdict(admitted=False, scope="tenant")
            if len(self._held) >= self.max_global:
                return Verdict(admitted=False, scope="global")
            self._held[request_id] = (tenant_id, now)
        return Verdict(admitted=True)

    def release(self, tenant_id: str, request_id: str) -> None:
        with self._lock:
            self._held.pop(request_id, None)

    def in_flight(self, tenant_id: str | None = None) -> int:
        with self._lock:
            return sum(1 for tenant, _ in self._held.values() if tenant_id is None or tenant == tenant_id)


class LocalDedup:
    """Finished results per key for ``window_s``, at most ``max_entries``, in this
    process. Nothing is ever "in flight" here: without the token bus, nobody
    could wait on another request's stream."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = 0
        self.max_entries = 0
        self._clock = clock
        self._done: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def configure(self, *, window_s: int, max_entries: int) -> LocalDedup:
        self.window_s, self.max_entries = window_s, max_entries
        return self

    def claim(self, key: str, request_id: str) -> tuple[str, str]:
        with self._lock:
            found = self._done.get(key)
            if found and found[0] > self._clock() - self.window_s:
                return "done", found[1]
            self._done.pop(key, None)
        return "claimed", request_id

    def complete(self, key: str, result_json: str) -> None:
        with self._lock:
            self._done[key] = (self._clock(), result_json)
            self._done.move_to_end(key)
            while len(self._done) > self.max_entries:
                self._done.popitem(last=False)

    def abandon(self, key: str, request_id: str) -> None:
        return None  # nothing in flight to clear, and errors are never cached


@dataclass
class _BreakerRecord:
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    half_opened_at: float = 0.0
    trials: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class LocalBreaker:
    """``CircuitBreaker``'s states and transitions (see its Lua scripts), per process."""

    _records: dict[str, _BreakerRecord] = {}
    _records_lock = threading.Lock()

    def __init__(self, *, worker: str, policy: BreakerPolicy, clock: Callable[[], float] = time.time) -> None:
        self.worker = worker
        self.policy = policy
        self._clock = clock
        with LocalBreaker._records_lock:
            self._record = LocalBreaker._records.setdefault(worker, _BreakerRecord())

    def allow(self) -> Permission:
        now, policy, r = self._clock(), self.policy, self._record
        with r.lock:
            if r.state == BreakerState.OPEN:
                if now - r.opened_at < policy.open_s:
                    return Permission(False, BreakerState.OPEN, r.opened_at + policy.open_s - now)
                r.state, r.trials, r.half_opened_at = BreakerState.HALF_OPEN, 0, now
            if r.state == BreakerState.HALF_OPEN:
                if now - r.half_opened_at >= policy.open_s:
                    r.trials, r.half_opened_at = 0, now  # a trial that never reported must not wedge it
                if r.trials >= policy.half_open_trials:
                    return Permission(False, BreakerState.HALF_OPEN, 1.0)
                r.trials += 1
                return Permission(True, BreakerState.HALF_OPEN)
            return Permission(True, BreakerState.CLOSED)

    def record(self, *, success: bool) -> BreakerState:
        r = self._record
        with r.lock:
            if success:
                r.state, r.trials, r.failures = BreakerState.CLOSED, 0, 0
                return r.state
            r.failures += 1
            if r.state == BreakerState.HALF_OPEN or r.failures >= self.policy.failure_threshold:
                r.state, r.opened_at, r.trials = BreakerState.OPEN, self._clock(), 0
            return r.state

    def state(self) -> BreakerState:
        return self._record.state

    @classmethod
    def reset(cls) -> None:
        with cls._records_lock:
            cls._records.clear()
