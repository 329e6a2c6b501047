"""Choosing the worker and model for a request, and building workers from the config.

A request names a worker (or takes the default), or names a route group of
``pipeline.toml`` (``[routes.NAME]``; ``"auto"`` is a name like another). In a group
the choice is ``choose_in_group``'s, from what the gateway knows without asking
anyone on the request's path (``RouteInputs``), in this order:

1. **availability**: a candidate whose circuit is open, or whose provider is rate
   limiting us, is passed over (while another can serve);
2. **latency**: with a ``latency_budget_ms``, the fastest candidate whose recent TTFT
   P95 fits it (none fits: the fastest there is);
3. **budget**: past ``cheap_above_budget_share`` of a budget that applies, the
   cheapest candidate;
4. **complexity**: a long prompt (``long_prompt_chars``) or one with code goes to
   the strongest (the dearest) candidate, any other to the cheapest.

The reason is one of ``RouteReason`` and goes back with the answer (``route``).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from orchestrator_site.errors import UnknownModel, UnknownWorker
from pipeline.config import PipelineSettings, RouteGroup, WorkerConfig
from pipeline.resilience.backoff import BackoffPolicy
from pipeline.resilience.retry import RetryingWorker
from pipeline.types import Usage
from workers.base import StreamingModelWorker
from workers.registry import build_worker


@dataclass(frozen=True)
class Route:
    worker: str
    model: str
    group: str = ""  # the route group it was chosen in ("": named directly)
    reason: str = ""  # why, in a group (RouteReason)

    def to_dict(self) -> dict[str, str]:
        return {"group": self.group, "worker": self.worker, "model": self.model, "reason": self.reason}


class RouteReason(StrEnum):
    AVAILABILITY = "availability"  # the candidate the rules chose could not serve: the next one did
    LATENCY = "latency"  # the fastest whose TTFT P95 fits the latency budget
    LATENCY_UNMET = "latency_unmet"  # none fits: the fastest there is
    BUDGET = "budget"  # a budget past its share: the cheapest
    COMPLEX = "complex"  # a long prompt, or code: the strongest
    SIMPLE = "simple"  # the cheapest


@dataclass(frozen=True)
class RouteInputs:
    """What a group's choice reads: the request's own, and the platform's as this
    process last saw it (no round trip on the request's path)."""

    prompt_chars: int = 0
    has_code: bool = False
    latency_budget_ms: float | None = None
    budget_share: float = 0.0  # the most used share of the budgets that apply (0: none)
    ttft_p95_ms: Mapping[str, float] = field(default_factory=dict)  # per worker; absent: no recent answers
    unavailable: frozenset[str] = frozenset()  # workers with an open circuit or a provider limiting us


_CODE = re.compile(r"```|^\s*(def|class|import|from|function|const|let|var|public|private|#include|SELECT|fn)\b|[{};]\s*$", re.MULTILINE)


def looks_like_code(text: str) -> bool:
    """A fenced block, or a line that begins or ends as code does."""
    return _CODE.search(text) is not None


def _price(config: PipelineSettings, worker: str) -> float:
    cfg = config.workers[worker]
    return cfg.price_input_per_mtok + cfg.price_output_per_mtok


def choose_in_group(config: PipelineSettings, name: str, inputs: RouteInputs) -> Route:
    """The worker and model for a request naming route group ``name`` (module docstring)."""
    group: RouteGroup = config.routes[name]
    candidates = [(c.worker, c.model or config.workers[c.worker].model_default) for c in group.candidates]
    by_price = sorted(candidates, key=lambda c: _price(config, c[0]))  # stable: ties keep the file's order
    if inputs.latency_budget_ms is not None:
        known = sorted((c for c in candidates if c[0] in inputs.ttft_p95_ms), key=lambda c: inputs.ttft_p95_ms[c[0]])
        fitting = [c for c in known if inputs.ttft_p95_ms[c[0]] <= inputs.latency_budget_ms]
        order, reason = (
            (fitting + [c for c in by_price if c not in fitting], RouteReason.LATENCY)
            if fitting
            else (known + [c for c in by_price if c not in known], RouteReason.LATENCY_UNMET)
        )
    elif inputs.budget_share >= group.cheap_above_budget_share and inputs.budget_share > 0:
        order, reason = by_price, RouteReason.BUDGET
    elif inputs.prompt_chars >= group.long_prompt_chars or inputs.has_code:
        order, reason = by_price[::-1], RouteReason.COMPLEX
    else:
        order, reason = by_price, RouteReason.SIMPLE
    for rank, (worker, model) in enumerate(order):
        if worker not in inputs.unavailable:
            return Route(worker, model, name, (RouteReason.AVAILABILITY if rank else reason).value)
    worker, model = order[0]  # nobody can serve: the rules' choice, which fails as it would alone
    return Route(worker, model, name, reason.value)


def cost_usd(config: PipelineSettings, worker: str, usage: Usage) -> float:
    """What an answer cost at the worker's configured prices (0 for a worker without
    prices, or one no longer configured)."""
    worker_cfg = config.workers.get(worker)
    if worker_cfg is None:
        return 0.0
    spent = usage.prompt_tokens * worker_cfg.price_input_per_mtok + usage.completion_tokens * worker_cfg.price_output_per_mtok
    return round(spent / 1_000_000, 10)


def worker_config(config: PipelineSettings, name: str) -> WorkerConfig:
    """The named worker's settings; ``UnknownWorker`` (with the names there are) if none."""
    worker_cfg = config.workers.get(name)
    if worker_cfg is None:
        raise UnknownWorker(f"no worker named {name!r}", data={"worker": name, "available": sorted(config.workers)})
    return worker_cfg


def names_a_group(config: PipelineSettings, *, worker: str | None, model: str | None) -> str | None:
    """The route group a request names, as its ``model`` (or its ``worker``), if any."""
    for name in (model, worker):
        if name and name in config.routes:
            return name
    return None


def route_request(config: PipelineSettings, *, worker: str | None, model: str | None) -> Route:
    name = worker or config.default_worker
    worker_cfg = worker_config(config, name)
    chosen = model or worker_cfg.model_default
    if worker_cfg.models and chosen not in worker_cfg.models:
        raise UnknownModel(f"worker {name!r} does not serve model {chosen!r}", data={"worker": name, "model": chosen, "available": list(worker_cfg.models)})
    return Route(worker=name, model=chosen)


class WorkerPool:
    """Built workers, one per name and worker settings: a reloaded config whose worker
    did not change keeps it (and its connections); a request pinned to an older
    version gets the worker that version describes."""

    MAX_BUILT = 64  # old versions' workers are dropped beyond this

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workers: dict[tuple[str, WorkerConfig], StreamingModelWorker] = {}

    def get(self, config: PipelineSettings, name: str) -> StreamingModelWorker:
        worker_cfg = config.workers.get(name)
        if worker_cfg is None:
            raise UnknownWorker(f"no worker named {name!r}", data={"worker": name})
        key = (name, worker_cfg)
        with self._lock:
            worker = self._workers.get(key)
            if worker is None:
                if len(self._workers) >= self.MAX_BUILT:
                    self._workers.clear()
                worker = self._workers[key] = with_retries(build_worker(worker_cfg.settings(name)), worker_cfg)
            return worker


def with_retries(worker: StreamingModelWorker, config: WorkerConfig) -> StreamingModelWorker:
    retry = config.retry
    if retry.attempts <= 1 or config.kind == "echo":
        return worker  # echo never fails transiently
    policy = BackoffPolicy(base_s=retry.base_ms / 1000, max_s=retry.max_ms / 1000, attempts=retry.attempts, retry_after_cap_s=retry.retry_after_cap_s)
    return RetryingWorker(worker, policy)


worker_pool = WorkerPool()
