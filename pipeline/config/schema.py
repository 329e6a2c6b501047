"""The pipeline config's schema: every table and key of ``pipeline.toml``, typed,
bounded and described. The descriptions are the reference: the JSON Schema
(``docs/pipeline.schema.json``) and ``docs/configuration.md`` are generated from them.

Field bounds are checked by pydantic. What relates one field to another (a
default worker that exists, a fallback that does not loop) is checked by
``reference_problems`` on the raw table, so that a file's every problem is
reported at once; the models' own validators call it too, so that a config
built in code holds the same invariants.
"""

from __future__ import annotations

import difflib
import os
import re
import string
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from workers.base import WorkerSettings

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
RootLogLevel = Literal["", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]  # "": LOG_LEVEL's
WorkerKind = Literal["echo", "openai", "anthropic", "llamacpp", "vllm"]
# The error type of a cross-field problem: the loader reports these from
# ``reference_problems`` instead, with the path of the field at fault.
REFERENCE_ERROR = "config_reference"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def template_placeholders(template: str) -> set[str]:
    """The ``{names}`` of a ``str.format`` template; ValueError when it does not parse."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def _check_template(template: str, allowed: set[str]) -> str:
    try:
        names = template_placeholders(template)
    except ValueError as exc:
        raise ValueError(f"not a valid template: {exc}") from exc
    unknown = names - allowed
    if unknown:
        shown = ", ".join("{" + name + "}" for name in sorted(unknown))
        raise ValueError(f"unknown placeholder {shown}; allowed: " + ", ".join("{" + name + "}" for name in sorted(allowed)))
    return template


class PipelineInfo(_Strict):
    """Names this config in logs, metrics, the admin and ``orchestrator explain``."""

    name: str = Field("default", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="The pipeline's name.")
    version: str = Field("1", min_length=1, max_length=50, description="The author's version label (the platform numbers stored versions itself).")


class LoggingConfig(_Strict):
    level: RootLogLevel = Field("", description='The root log level; "" keeps the LOG_LEVEL environment variable\'s (default INFO).')
    loggers: dict[str, LogLevel] = Field(
        default_factory=dict, json_schema_extra={"default": {}}, description='Levels of single loggers, by name: { "pipeline.services" = "DEBUG" }.'
    )

    @field_validator("loggers")
    @classmethod
    def _logger_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", name):
                raise ValueError(f"{name!r} is not a logger name (dotted identifiers, such as pipeline.services)")
        return value


class QueuesConfig(_Strict):
    """How much work each process takes at once. Read when a process starts; a
    worker's ``-c`` on the command line wins."""

    realtime_concurrency: int = Field(32, ge=1, le=1000, description="Threads of a real-time worker: requests it runs at once.")
    batch_concurrency: int = Field(2, ge=1, le=256, description="Processes of a batch worker: chunks it runs at once.")
    publish_threads: int = Field(4, ge=1, le=64, description="Threads of a gateway process that publish real-time tasks to the broker.")


class RagConfig(_Strict):
    enabled: bool = Field(True, description="Whether prompts are given context from the tenant's documents.")
    top_k: int = Field(3, ge=1, le=50, description="Documents retrieved per prompt.")
    max_context_chars: int = Field(4000, ge=0, le=200_000, description="Title and body characters put into the prompt, at most.")
    timeout_ms: int = Field(250, ge=1, le=60_000, description="A slower search is abandoned; the prompt goes on without context.")
    text_search_config: str = Field("english", pattern=r"^[a-z_]+$", description="The Postgres text search configuration of the search.")


class AssembleConfig(_Strict):
    system_prompt: str = Field("You are a helpful assistant.", description="The system message of every prompt.")
    context_template: str = Field(
        "Answer using this context when it is relevant:\n\n{context}", description="How retrieved context enters the prompt; placeholder {context}."
    )
    document_template: str = Field("[{title}]\n{body}", description="How each document enters the context; placeholders {title} and {body}.")
    history_turns: int = Field(10, ge=0, le=200, description="Earlier exchanges of the session replayed, at most.")

    @field_validator("context_template")
    @classmethod
    def _context(cls, value: str) -> str:
        return _check_template(value, {"context"})

    @field_validator("document_template")
    @classmethod
    def _document(cls, value: str) -> str:
        return _check_template(value, {"title", "body"})


class RedactionPattern(_Strict):
    name: str = Field(min_length=1, description="The pattern's name, for logs.")
    pattern: str = Field(description="A Python regular expression; its matches are replaced.")
    # A streaming filter holds this much text back, so that a match split across
    # chunks is still caught.
    max_length: int = Field(128, ge=1, le=4096, description="How many characters a match can span at most.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value


class PostprocessConfig(_Strict):
    trim: bool = Field(True, description="Strip whitespace around the answer.")
    stop: tuple[str, ...] = Field((), description="Stop sequences applied to every answer (requests may add more).")
    redact_emails: bool = Field(True, description="Replace e-mail addresses in answers.")
    redact_api_keys: bool = Field(True, description="Replace strings shaped like provider API keys in answers.")
    patterns: tuple[RedactionPattern, ...] = Field((), description="More patterns to redact.")
    replacement: str = Field("[REDACTED]", description="What a redacted match becomes.")


class LimitsConfig(_Strict):
    max_prompt_chars: int = Field(32_000, ge=1, le=2_000_000, description="A longer prompt is refused: 413 prompt_too_large.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a request that sets none.")
    max_tokens_limit: int = Field(4096, ge=1, description="The largest max_tokens a request may ask for.")
    request_timeout_s: float = Field(120.0, gt=0, le=3600, description="Every real-time run's deadline; the client then gets worker_timeout.")
    max_stop_sequences: int = Field(4, ge=0, le=16, description="Stop sequences one request may add.")
    max_inflight_per_tenant: int = Field(100, ge=1, description="Real-time requests queued or running at once, per tenant; beyond, 503 overloaded.")
    max_inflight_global: int = Field(1000, ge=1, description="Real-time requests queued or running at once, in all; beyond, 503 overloaded.")
    run_lease_s: float = Field(
        3.0, ge=0.5, le=60, description="A run's lease, renewed every third of it: a dead worker's run is noticed this long after its last renewal."
    )
    queue_lease_s: float = Field(
        10.0, ge=1, le=600, description="A published request's lease until a worker takes it: a message lost on the way is published again after this long."
    )
    max_runs: int = Field(2, ge=1, le=10, description="Runs of one request that may die before it fails with worker_lost.")


class RateLimitConfig(_Strict):
    """Defaults for tenants whose own limits are empty; 0 means no limit."""

    requests_per_minute: int = Field(0, ge=0, description="Requests per sliding minute, per tenant, across every gateway process.")
    tokens_per_minute: int = Field(0, ge=0, description="Tokens of finished requests per sliding minute, per tenant.")


class DedupConfig(_Strict):
    """Identical requests (same tenant, session and answer-relevant fields) share one answer."""

    enabled: bool = Field(True, description="In flight, a duplicate attaches to the first one's stream; finished, its answer is served again.")
    window_s: int = Field(30, ge=1, le=86_400, description="How long a finished answer is served again (errors never are).")
    max_entries: int = Field(10_000, ge=1, description="Finished answers kept at most; the oldest go first.")


class TokenBusConfig(_Strict):
    maxlen: int = Field(10_000, ge=10, description="Entries kept per request stream.")
    ttl_s: int = Field(3600, ge=10, description="How long streams and request status stay readable.")


class BatchConfig(_Strict):
    """Batch jobs (``POST /api/v1/batch``): their items run on the ``batch.*`` queues,
    never beside a real-time request."""

    max_items: int = Field(50_000, ge=1, le=1_000_000, description="Prompts in one job at most.")
    max_body_mb: int = Field(64, ge=1, le=1024, description="A job's request body at most, in MB.")
    chunk_size: int = Field(25, ge=1, le=10_000, description="Items per Celery task.")
    claim_group: int = Field(
        10, ge=1, le=1000, description="Items a chunk claims in one transaction and records in one: fewer round trips, more items run again after a crash."
    )
    max_attempts: int = Field(3, ge=1, le=20, description="Tries of an item whose provider is down before it is failed.")
    retry_delay_s: float = Field(30.0, ge=0, le=3600, description="Wait before a chunk whose provider was down runs again.")
    lease_s: float = Field(600.0, gt=0, le=86_400, description="An item being run is nobody else's for this long.")
    stall_after_s: float = Field(300.0, gt=0, le=86_400, description="A job without progress this long is re-queued by the scheduler's sweep.")
    deadline_near_s: float = Field(
        300.0, ge=0, le=86_400, description="A job this close to its deadline runs before any other batch work, whatever its priority."
    )
    output_dir: str = Field(
        "var/batch-output",
        description="Where file destinations write (relative to the working directory, or absolute); every batch worker must see the same directory.",
    )
    delivery_attempts: int = Field(5, ge=1, le=100, description="Tries of a destination's delivery before it is marked failed (the admin can retry it).")
    delivery_backoff_s: float = Field(30.0, ge=0, le=86_400, description="Wait after a failed delivery before the next try; doubled after each.")
    webhook_allow: list[str] = Field(
        default_factory=list,
        description="Networks (CIDR) a webhook URL or an s3 destination's endpoint_url may reach besides the public internet: loopback, private and link-local addresses are refused unless listed.",
    )
    webhook_lines: int = Field(500, ge=1, le=100_000, description="Result lines in one webhook POST.")
    webhook_timeout_s: float = Field(10.0, gt=0, le=300, description="How long a webhook receiver has to answer one POST.")
    s3_part_mb: int = Field(
        8, ge=5, le=5120, description="s3 destinations: results larger than this go up as a multipart upload of parts this size (S3's least is 5)."
    )
    s3_timeout_s: float = Field(30.0, gt=0, le=600, description="s3 destinations: connect and read timeout of each call to S3.")

    @field_validator("webhook_allow")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"{network!r} is not a network (CIDR, e.g. 10.0.0.0/8 or 127.0.0.1/32)") from exc
        return value


class RetryConfig(_Strict):
    attempts: int = Field(3, ge=1, le=10, description="Calls in all, the first one included; 1 = no retry. Only transient errors are retried.")
    base_ms: float = Field(200, gt=0, description="Full-jitter backoff: uniform(0, min(max_ms, base_ms * 2^attempt)).")
    max_ms: float = Field(10_000, gt=0, description="The longest backoff.")
    retry_after_cap_s: float = Field(30.0, ge=0, description="A provider's Retry-After replaces the backoff, up to this.")


class BreakerConfig(_Strict):
    failure_threshold: int = Field(5, ge=1, description="Consecutive transient failures (after retries) that open the circuit.")
    open_s: float = Field(30.0, gt=0, description="How long it stays open before trial calls.")
    half_open_trials: int = Field(1, ge=1, description="Calls let through while half-open; one success closes it, one failure reopens it.")


class WorkerConfig(_Strict):
    kind: WorkerKind = Field(description="The provider's protocol.")
    base_url: str = Field("", description="The provider's URL (every kind but echo needs one).")
    api_key_env: str = Field("", description="The environment variable holding the API key: secrets stay out of the file.")
    models: tuple[str, ...] = Field((), description="What a request may ask for (empty: anything).")
    default_model: str = Field("", description="The model of a request that names none (empty: the first of models).")
    timeout_s: float = Field(60.0, gt=0, description="A provider call's read timeout.")
    connect_timeout_s: float = Field(5.0, gt=0, description="A provider call's connect timeout.")
    max_connections: int = Field(100, ge=1, description="Connections to the provider per process, at most.")
    token_count: int = Field(16, ge=0, le=100_000, description="echo only: tokens per answer.")
    token_delay_ms: float = Field(0.0, ge=0, description="echo only: delay per token.")
    prompt_format: Literal["chatml", "plain"] = Field("chatml", description="llamacpp only: how chat messages become one prompt.")
    retry: RetryConfig = Field(RetryConfig(), description="Retries of transient provider errors.")
    breaker: BreakerConfig = Field(BreakerConfig(), description="The circuit breaker, shared by every process through Redis.")
    fallback: str = Field(
        "", description="The worker that serves this one's requests while its circuit is open, and continues its answers that fail mid-stream."
    )
    price_input_per_mtok: float = Field(0.0, ge=0, description="USD per million prompt tokens: the cost in each answer's done event.")
    price_output_per_mtok: float = Field(0.0, ge=0, description="USD per million answer tokens.")

    @property
    def model_default(self) -> str:
        return self.default_model or (self.models[0] if self.models else self.kind)

    def settings(self, name: str) -> WorkerSettings:
        return WorkerSettings(
            name=name,
            kind=self.kind,
            base_url=self.base_url,
            api_key=os.environ.get(self.api_key_env, "") if self.api_key_env else "",
            models=self.models,
            timeout_s=self.timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            max_connections=self.max_connections,
            token_count=self.token_count,
            token_delay_s=self.token_delay_ms / 1000.0,
            prompt_format=self.prompt_format,
        )


class RouteCandidate(_Strict):
    worker: str = Field(description="A worker of [workers].")
    model: str = Field("", description="One of its models (empty: its default model).")


class RouteGroup(_Strict):
    """Workers a request may be routed among when it names the group as its model
    (or worker) instead of a worker: by availability, latency budget, budget share
    and the prompt's complexity (docs/api.md, "Route groups")."""

    candidates: tuple[RouteCandidate, ...] = Field(min_length=1, description="The workers and models to choose among; price decides cheap and strong.")
    cheap_above_budget_share: float = Field(
        0.8, ge=0, le=1, description="Past this share used of a budget that applies, the cheapest candidate that can serve, whatever the prompt."
    )
    long_prompt_chars: int = Field(
        2000, ge=1, description="A prompt this long (or one with code) goes to the strongest candidate; shorter ones to the cheapest."
    )


def _default_workers() -> dict[str, WorkerConfig]:
    return {"echo": WorkerConfig(kind="echo", models=("echo-1",))}


class PipelineSettings(_Strict):
    pipeline: PipelineInfo = Field(PipelineInfo(), description="The pipeline's name and version label.")
    default_worker: str = Field("echo", description="The worker a request uses when it names none.")
    workers: dict[str, WorkerConfig] = Field(
        default_factory=_default_workers,
        json_schema_extra={"default": {"echo": {"kind": "echo", "models": ["echo-1"]}}},
        description="The model providers, by name.",
    )
    rag: RagConfig = Field(RagConfig(), description="The RAG stage: context from the tenant's documents.")
    assemble: AssembleConfig = Field(AssembleConfig(), description="The assemble stage: the prompt the provider gets.")
    postprocess: PostprocessConfig = Field(PostprocessConfig(), description="The post-process stage: trimming, stop sequences, redaction.")
    limits: LimitsConfig = Field(LimitsConfig(), description="Request limits, deadlines and leases.")
    tokenbus: TokenBusConfig = Field(TokenBusConfig(), description="The token stream between a worker and the gateway.")
    rate_limits: RateLimitConfig = Field(RateLimitConfig(), description="Rate limits of tenants that set none.")
    dedup: DedupConfig = Field(DedupConfig(), description="Deduplication of identical requests.")
    batch: BatchConfig = Field(BatchConfig(), description="Batch jobs.")
    logging: LoggingConfig = Field(LoggingConfig(), description="Log levels.")
    queues: QueuesConfig = Field(QueuesConfig(), description="Concurrency and queue bounds of each process.")
    routes: dict[str, RouteGroup] = Field(default_factory=dict, description="Route groups, by name: a request naming one is routed among its candidates.")

    @model_validator(mode="after")
    def _references(self) -> PipelineSettings:
        problems = reference_problems(self.model_dump(mode="python"))
        if problems:
            loc, message = problems[0]
            raise PydanticCustomError(REFERENCE_ERROR, "{where}: {message}", {"where": ".".join(map(str, loc)), "message": message})
        return self


def suggestion(word: str, options: Iterable[str]) -> str:
    """``; did you mean "x"?`` when one of ``options`` is close to ``word``, else ""."""
    by_lower = {option.lower(): option for option in options}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f'; did you mean "{by_lower[close[0]]}"?' if close else ""


def _names(names: list[str]) -> str:
    return ", ".join(f'"{name}"' for name in names)


def reference_problems(raw: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """What relates fields to each other, as (path, message) pairs, read from the raw
    table (pieces of the wrong shape are left to the field checks)."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    workers = raw.get("workers", {"echo": {}})
    if not isinstance(workers, Mapping):
        workers = {}  # the field check reports it; no name can be checked against it
        default = None
    else:
        default = raw.get("default_worker", "echo")
    names = sorted(str(name) for name in workers)
    if isinstance(default, str) and default not in workers:
        there = f"the workers are {_names(names)}{suggestion(default, names)}" if names else "there are no workers"
        problems.append((("default_worker",), f'"{default}" is not a worker; {there}'))
    for name, worker in workers.items():
        if not isinstance(worker, Mapping):
            continue
        problems.extend(_worker_problems(str(name), worker, names))
    problems.extend(_fallback_loops(workers))
    routes = raw.get("routes", {})
    if isinstance(routes, Mapping):
        for group, route in routes.items():
            problems.extend(_route_problems(str(group), route, workers, names))
    limits = raw.get("limits", {})
    if isinstance(limits, Mapping):
        default_max, limit = limits.get("default_max_tokens", 256), limits.get("max_tokens_limit", 4096)
        if isinstance(default_max, int) and isinstance(limit, int) and default_max > limit:
            problems.append((("limits", "default_max_tokens"), f"{default_max} is more than limits.max_tokens_limit ({limit})"))
    return problems


def _route_problems(group: str, route: Any, workers: Mapping[str, Any], names: list[str]) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
    if group in workers:
        problems.append((("routes", group), f'"{group}" is a worker\'s name too: a request naming it would be ambiguous'))
    candidates = route.get("candidates", ()) if isinstance(route, Mapping) else ()
    for n, candidate in enumerate(candidates if isinstance(candidates, list | tuple) else ()):
        if not isinstance(candidate, Mapping) or not isinstance(candidate.get("worker"), str):
            continue
        worker = candidate["worker"]
        if worker not in workers:
            problems.append((("routes", group, "candidates", n, "worker"), f'"{worker}" is not a worker{suggestion(worker, names)}'))
            continue
        models = workers[worker].get("models", ()) if isinstance(workers[worker], Mapping) else ()
        model = candidate.get("model", "")
        if model and isinstance(models, list | tuple) and models and model not in models:
            options = [str(m) for m in models]
            problems.append(
                (("routes", group, "candidates", n, "model"), f'"{model}" is not one of {worker}\'s models: {_names(options)}{suggestion(model, options)}')
            )
    return problems


def _worker_problems(name: str, worker: Mapping[str, Any], names: list[str]) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
    kind = worker.get("kind")
    if kind in typing.get_args(WorkerKind) and kind != "echo" and not worker.get("base_url"):
        problems.append((("workers", name, "base_url"), f"a {kind} worker needs base_url"))
    models, default_model = worker.get("models", ()), worker.get("default_model", "")
    if isinstance(models, list | tuple) and models and isinstance(default_model, str) and default_model and default_model not in models:
        options = [str(m) for m in models]
        problems.append((("workers", name, "default_model"), f'"{default_model}" is not one of models: {_names(options)}{suggestion(default_model, options)}'))
    fallback = worker.get("fallback", "")
    if isinstance(fallback, str) and fallback:
        if fallback == name:
            problems.append((("workers", name, "fallback"), f'"{fallback}" is this worker itself; name another worker'))
        elif fallback not in names:
            others = [n for n in names if n != name]
            there = f"the others are {_names(others)}{suggestion(fallback, others)}" if others else "there is no other worker"
            problems.append((("workers", name, "fallback"), f'"{fallback}" is not a worker; {there}'))
    return problems


def _fallback_loops(workers: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """A chain of fallbacks that comes back to a worker it passed: each loop once, at
    its first worker by name."""
    nxt = {str(n): w.get("fallback") for n, w in workers.items() if isinstance(w, Mapping) and isinstance(w.get("fallback"), str) and w.get("fallback")}
    loops: list[tuple[tuple[str | int, ...], str]] = []
    seen_loops: set[frozenset[str]] = set()
    for start in sorted(nxt):
        chain = [start]
        while (step := nxt.get(chain[-1])) is not None and step in workers and step not in chain:
            chain.append(step)
        if step is not None and step in chain and step != chain[-1]:
            loop = chain[chain.index(step) :]
            if frozenset(loop) not in seen_loops:
                seen_loops.add(frozenset(loop))
                first = min(loop)
                at = loop.index(first)
                ordered = loop[at:] + loop[:at] + [first]
                loops.append((("workers", first, "fallback"), "fallback loop: " + " → ".join(ordered)))
    return loops
