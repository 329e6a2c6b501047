"""Where an answer goes on when its provider fails mid-stream (``pipeline.failover``).

The candidates, in order: the rest of the request's route group, as listed, then
the failed worker's ``fallback`` chain. Passed over: a worker the answer already
tried, one that cannot continue a partial answer (``continues_prefix``: OpenAI's
API cannot), and one whose circuit is open. The failed provider's failure goes
into its breaker at once.

A request under a budget moves only when its reservation can cover what the failed
providers cost (at their bounds where they did not say) plus the fallback's worst
case at its own prices; otherwise the provider's error is the answer, as without a
fallback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import structlog

from pipeline import metrics
from pipeline.config import PipelineSettings
from pipeline.failover import Failover, Next
from pipeline.routing import worker_pool
from pipeline.services import budgets, gates
from pipeline.types import AssembledPrompt, Leg, PromptRequest

log = structlog.get_logger("pipeline.services")


def candidates(config: PipelineSettings, request: PromptRequest, failed: str) -> Iterator[tuple[str, str]]:
    """(worker, model) to go on on, in order of preference; may repeat a worker."""
    group = config.routes.get((request.route or {}).get("group", ""))
    for candidate in group.candidates if group else ():
        if candidate.worker in config.workers:
            yield candidate.worker, candidate.model or config.workers[candidate.worker].model_default
    fallback = config.workers[failed].fallback if failed in config.workers else ""
    seen: set[str] = set()
    while fallback and fallback in config.workers and fallback not in seen:  # the config refuses loops; this holds without it
        seen.add(fallback)
        yield fallback, config.workers[fallback].model_default
        fallback = config.workers[fallback].fallback


def planner(request: PromptRequest, config: PipelineSettings, *, budget_key: str | None = None) -> Failover:
    """The request's failover: ``budget_key`` is its reservation's, when a budget applies."""

    def plan(legs: tuple[Leg, ...], prompt: AssembledPrompt) -> Next | None:
        failed = legs[-1]
        gates.breaker_for(config, failed.worker).record(success=False)
        tried = {leg.worker for leg in legs}
        for name, model in candidates(config, request, failed.worker):
            worker = worker_pool.get(config, name)
            if name in tried or not getattr(worker, "continues_prefix", False) or not gates.breaker_for(config, name).allow().allowed:
                continue
            following = dataclasses.replace(prompt, model=model)
            if budget_key is not None and not budgets.cover_failover(budget_key, config, legs, worker=name, prompt=following):
                log.warning("failover_refused", request_id=request.request_id, worker=failed.worker, fallback=name, reason="budget", outcome="error")
                return None
            metrics.child(metrics.FAILOVERS, failed.worker, name).inc()
            log.warning("failover", request_id=request.request_id, worker=failed.worker, fallback=name, error_code=failed.error, outcome="fallback")
            return Next(worker, following)
        return None

    return plan
