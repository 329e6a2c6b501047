"""The gateway's own run of a request while Redis is down (``services.start``).

No queue and no token bus could carry it, and no worker can hold it (its message
never left), so this process runs the stages itself and answers in one piece, on
its own gates: limits, breaker and deduplication as ``resilience.local`` keeps
them. Nothing of it is recorded in Redis, so nothing there can start it again.
"""

from __future__ import annotations

import json
import time

import structlog
from django.db import close_old_connections

from orchestrator_site.errors import OrchestratorError
from pipeline import metrics
from pipeline.config import PipelineSettings, get_config
from pipeline.resilience.dedup import dedup_key
from pipeline.services import budgets, execute, gates, sessions
from pipeline.types import DedupMode, PipelineResult, PromptRequest, TokenChunk

log = structlog.get_logger("pipeline.services")


def infer_local(*, request: PromptRequest) -> PipelineResult:
    """Run ``request`` here and return its answer (or raise its error)."""
    config = get_config()
    key = dedup_key(request) if config.dedup.enabled and request.dedup is DedupMode.FULL else None  # only the local window: nothing joins here
    clock = metrics.StreamClock(request.worker, accepted_at=time.time())
    log.warning("request_run_inline", request_id=request.request_id, session_id=request.session_id, outcome="degraded", reason="redis unavailable")
    try:
        result = gates.run_guarded(request, config, lambda routed: _run_stages(routed, config, clock))
        # Its cost goes into the ledger (which a rebuild reads), though no budget applies:
        # one that did would have refused the request while Redis is down.
        cost = budgets.actual_nano(result, config)
        usage = budgets.ledger_row(result, cost_nano=cost)
        sessions.session_turns_append(request=request, reply=result.text, usage=usage)
    except OrchestratorError as exc:
        clock.finished(exc.code)
        raise
    finally:
        gates.local_admission(config).release(request.tenant_id, request.request_id)
        # An executor thread of the gateway, not a request thread: Django would never
        # hand its connection back to the pool.
        close_old_connections()
    clock.finished("ok")
    if key:
        gates.local_dedup(config).complete(key, json.dumps(result.to_dict()))
    gates.local_limiter().record_tokens(request.tenant_id, request.request_id, result.usage.total_tokens)
    budgets.count_spend(request.tenant_id, result, config)
    return result


def _run_stages(request: PromptRequest, config: PipelineSettings, clock: metrics.StreamClock) -> PipelineResult:
    def count(chunk: TokenChunk) -> None:
        clock.token()  # the answer goes out whole: nothing to publish

    return execute.run_stages(request, config, clock, publish=count, deadline_at=time.time() + config.limits.request_timeout_s)
