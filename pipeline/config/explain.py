"""A config in plain words (``orchestrator explain``): the workers and their models,
prices and fallbacks, which limits apply to whom, what each stage does with these
settings, and what looks wrong though it is valid."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pipeline.config.schema import PipelineSettings, WorkerConfig


@dataclass
class Explanation:
    title: str
    sections: list[tuple[str, list[str]]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def text(self) -> str:
        out = [self.title, ""]
        for header, lines in self.sections:
            out.append(header)
            out.extend(f"  {line}" for line in lines)
            out.append("")
        out.append("Warnings" if self.warnings else "Warnings: none")
        out.extend(f"  - {warning}" for warning in self.warnings)
        return "\n".join(out) + "\n"


def _short(text: str, at: int = 60) -> str:
    flat = " ".join(text.split())
    return f'"{flat}"' if len(flat) <= at else f'"{flat[: at - 1]}…"'


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _worker(name: str, worker: WorkerConfig) -> str:
    where = "offline, echoes the prompt" if worker.kind == "echo" else f"{worker.kind} at {worker.base_url}"
    models = (
        ", ".join(f"{m} (default)" if m == worker.model_default else m for m in worker.models)
        if worker.models
        else f"any model (default {worker.model_default})"
    )
    parts = [f"{name}: {where}; models {models}"]
    if worker.price_input_per_mtok or worker.price_output_per_mtok:
        parts.append(f"${worker.price_input_per_mtok:g} in / ${worker.price_output_per_mtok:g} out per million tokens")
    if worker.kind != "echo":
        retry, breaker = worker.retry, worker.breaker
        calls = "no retry" if retry.attempts == 1 else f"up to {retry.attempts} calls, backoff {retry.base_ms:g}-{retry.max_ms:g} ms"
        parts.append(f"{calls}; the circuit opens after {breaker.failure_threshold} failures in a row, for {_seconds(breaker.open_s)}")
    parts.append(f"falls back to {worker.fallback} while open" if worker.fallback else "no fallback")
    return "; ".join(parts)


def _warnings(config: PipelineSettings) -> list[str]:
    warnings = []
    http = {name: w for name, w in config.workers.items() if w.kind != "echo"}
    if http and not any(w.fallback for w in http.values()):
        warnings.append("no worker has a fallback: a provider's open circuit fails its requests fast")
    for name, worker in sorted(http.items()):
        hosted = worker.kind in ("openai", "anthropic")  # a local server (llamacpp, vllm) often costs nothing and needs no key
        if hosted and not (worker.price_input_per_mtok or worker.price_output_per_mtok):
            warnings.append(f"{name} has no price: its answers cost $0 in usage and cost reports")
        if worker.api_key_env and not os.environ.get(worker.api_key_env):
            warnings.append(f"{name} reads its API key from {worker.api_key_env}, which is not set in this environment")
        if hosted and not worker.api_key_env:
            warnings.append(f"{name} sends no API key (api_key_env is empty)")
    if not (config.rate_limits.requests_per_minute or config.rate_limits.tokens_per_minute):
        warnings.append("tenants without their own rate limits have none")
    if config.limits.request_timeout_s < max((w.timeout_s for w in config.workers.values()), default=0):
        warnings.append("limits.request_timeout_s is shorter than a worker's timeout_s: the deadline ends the call first")
    return warnings


def explain(config: PipelineSettings) -> Explanation:
    """What ``config`` makes the platform do."""
    limits, rag, assemble, post = config.limits, config.rag, config.assemble, config.postprocess
    out = Explanation(f'Pipeline "{config.pipeline.name}", version {config.pipeline.version}')
    out.sections.append((f"Workers (a request that names none goes to {config.default_worker})", [_worker(n, w) for n, w in sorted(config.workers.items())]))
    redact = [what for what, on in (("e-mail addresses", post.redact_emails), ("API keys", post.redact_api_keys)) if on]
    redact += [f"{p.name} matches" for p in post.patterns]
    stages = [
        f"rag: the {rag.top_k} best documents of the tenant, up to {rag.max_context_chars} characters, given up after {rag.timeout_ms} ms"
        if rag.enabled
        else "rag: off, prompts get no context",
        f"assemble: system prompt {_short(assemble.system_prompt)}; the last {assemble.history_turns} turns of the session",
        f"inference: max_tokens {limits.default_max_tokens} unless the request says, {limits.max_tokens_limit} at most; every run ends by {_seconds(limits.request_timeout_s)}",
        "post-process: "
        + "; ".join(
            part
            for part in (
                "trims the answer" if post.trim else "keeps whitespace",
                f"stops at {', '.join(repr(s) for s in post.stop)}" if post.stop else "",
                f"replaces {', '.join(redact)} with {post.replacement!r}" if redact else "redacts nothing",
            )
            if part
        ),
        f"stream: each request's tokens readable for {config.tokenbus.ttl_s} s, {config.tokenbus.maxlen} entries at most",
    ]
    out.sections.append(("Stages", stages))
    rates = config.rate_limits
    rate = (
        ", ".join(f"{v} {unit} per minute" for v, unit in ((rates.requests_per_minute, "requests"), (rates.tokens_per_minute, "tokens")) if v)
        or "no rate limit"
    )
    out.sections.append(
        (
            "Limits",
            [
                f"prompts up to {limits.max_prompt_chars} characters; up to {limits.max_stop_sequences} stop sequences per request",
                f"in flight at once: {limits.max_inflight_per_tenant} per tenant, {limits.max_inflight_global} in all; beyond, 503 overloaded",
                f"tenants without their own limits: {rate}",
                f"identical requests share one answer, served again for {config.dedup.window_s} s" if config.dedup.enabled else "deduplication is off",
                f"a worker that dies is noticed within {_seconds(limits.run_lease_s)} plus a sweep; a request runs {limits.max_runs} times at most",
            ],
        )
    )
    batch, queues = config.batch, config.queues
    out.sections.append(
        (
            "Batch and processes",
            [
                f"batch jobs of up to {batch.max_items} items, {batch.chunk_size} per task, {batch.max_attempts} tries per item",
                f"a real-time worker runs {queues.realtime_concurrency} requests at once; a batch worker {queues.batch_concurrency} chunks",
                f"a gateway publishes from {queues.publish_threads} threads",
            ],
        )
    )
    levels = [f"root at {config.logging.level or 'LOG_LEVEL (environment)'}"] + [f"{name} at {level}" for name, level in sorted(config.logging.loggers.items())]
    out.sections.append(("Logging", ["; ".join(levels)]))
    out.warnings = _warnings(config)
    return out
