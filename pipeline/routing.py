"""Choosing the worker and model for a request, and building workers from the config."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from orchestrator_site.errors import UnknownModel, UnknownWorker
from pipeline.config import PipelineSettings, WorkerConfig
from pipeline.resilience.backoff import BackoffPolicy
from pipeline.resilience.retry import RetryingWorker
from pipeline.types import Usage
from workers.base import StreamingModelWorker
from workers.registry import build_worker


@dataclass(frozen=True)
class Route:
    worker: str
    model: str


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
