"""Inference: one call to the routed worker."""

from __future__ import annotations

from dataclasses import replace

from pipeline.stages.context import StageContext, require_prompt
from workers.base import ModelWorker


def inference(ctx: StageContext, *, worker: ModelWorker) -> StageContext:
    completion = worker.infer(require_prompt(ctx))
    return replace(ctx, completion=completion, finish_reason=completion.finish_reason)
