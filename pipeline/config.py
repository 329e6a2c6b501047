"""The one typed pipeline config, read from ``pipeline.toml`` (every key optional).

Infrastructure (URLs, secrets) comes from the environment; what the pipeline
does comes only from this object. ``pipeline.example.toml`` documents every key.
"""

from __future__ import annotations

import os
import re
import string
import threading
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator_site.errors import ConfigInvalid
from workers.base import WorkerSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _placeholders(template: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"bad template {template!r}: {exc}") from exc


def _check_template(template: str, allowed: set[str]) -> str:
    unknown = _placeholders(template) - allowed
    if unknown:
        raise ValueError(f"unknown placeholders {sorted(unknown)}; allowed: {sorted(allowed)}")
    return template


class RagConfig(_Strict):
    enabled: bool = True
    top_k: int = Field(3, ge=1, le=50)
    max_context_chars: int = Field(4000, ge=0, le=200_000)
    timeout_ms: int = Field(250, ge=1, le=60_000)
    text_search_config: str = Field("english", pattern=r"^[a-z_]+$")


class AssembleConfig(_Strict):
    system_prompt: str = "You are a helpful assistant."
    context_template: str = "Answer using this context when it is relevant:\n\n{context}"
    document_template: str = "[{title}]\n{body}"
    history_turns: int = Field(10, ge=0, le=200)

    @field_validator("context_template")
    @classmethod
    def _context(cls, value: str) -> str:
        return _check_template(value, {"context"})

    @field_validator("document_template")
    @classmethod
    def _document(cls, value: str) -> str:
        return _check_template(value, {"title", "body"})


class RedactionPattern(_Strict):
    name: str
    pattern: str
    # How many characters a match can span at most: a streaming filter holds this
    # much text back so that a match split across chunks is still caught.
    max_length: int = Field(128, ge=1, le=4096)

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from exc
        return value


class PostprocessConfig(_Strict):
    trim: bool = True
    stop: tuple[str, ...] = ()
    redact_emails: bool = True
    redact_api_keys: bool = True
    patterns: tuple[RedactionPattern, ...] = ()
    replacement: str = "[REDACTED]"


class LimitsConfig(_Strict):
    max_prompt_chars: int = Field(32_000, ge=1, le=2_000_000)
    default_max_tokens: int = Field(256, ge=1)
    max_tokens_limit: int = Field(4096, ge=1)
    request_timeout_s: float = Field(120.0, gt=0, le=3600)
    max_stop_sequences: int = Field(4, ge=0, le=16)
    # Real-time requests queued or running at once; beyond, new ones are shed with a 503.
    max_inflight_per_tenant: int = Field(100, ge=1)
    max_inflight_global: int = Field(1000, ge=1)
    # A run's lease: renewed every third of it while the run lives. A run whose worker
    # died is noticed this long after its last renewal, plus a sweep's interval (1 s).
    run_lease_s: float = Field(3.0, ge=0.5, le=60)
    # A published request's lease until a worker takes its message: a message lost
    # on the way (a broker restart) is published again after this long.
    queue_lease_s: float = Field(10.0, ge=1, le=600)
    # Runs of one request that may die before it fails with worker_lost (a request
    # that kills its worker must not kill them all, one after the other).
    max_runs: int = Field(2, ge=1, le=10)


class RateLimitConfig(_Strict):
    """Defaults for tenants whose own limits are empty; 0 means no limit."""

    requests_per_minute: int = Field(0, ge=0)
    tokens_per_minute: int = Field(0, ge=0)


class DedupConfig(_Strict):
    """Identical requests (same tenant, session and answer-relevant fields) share one answer."""

    enabled: bool = True
    window_s: int = Field(30, ge=1, le=86_400)  # how long a finished answer is served again
    max_entries: int = Field(10_000, ge=1)  # finished answers kept at most; the oldest go first


class TokenBusConfig(_Strict):
    maxlen: int = Field(10_000, ge=10)  # entries kept per request stream
    ttl_s: int = Field(3600, ge=10)  # how long streams and request status stay readable


class BatchConfig(_Strict):
    """Batch jobs (``POST /api/v1/batch``): their items run on the ``batch.*`` queues,
    never beside a real-time request."""

    max_items: int = Field(50_000, ge=1, le=1_000_000)  # prompts in one job at most
    max_body_mb: int = Field(64, ge=1, le=1024)  # a job's request body at most
    chunk_size: int = Field(25, ge=1, le=10_000)  # items per Celery task
    max_attempts: int = Field(3, ge=1, le=20)  # tries of an item whose provider is down before it is failed
    retry_delay_s: float = Field(30.0, ge=0, le=3600)  # wait before a chunk whose provider was down runs again
    lease_s: float = Field(600.0, gt=0, le=86_400)  # an item being run is nobody else's for this long
    stall_after_s: float = Field(300.0, gt=0, le=86_400)  # a job without progress this long is re-queued by the sweep


class RetryConfig(_Strict):
    attempts: int = Field(3, ge=1, le=10)  # calls in all, the first one included; 1 = no retry
    base_ms: float = Field(200, gt=0)
    max_ms: float = Field(10_000, gt=0)
    retry_after_cap_s: float = Field(30.0, ge=0)  # a provider's Retry-After is honoured up to this


class BreakerConfig(_Strict):
    failure_threshold: int = Field(5, ge=1)  # consecutive transient failures that open the circuit
    open_s: float = Field(30.0, gt=0)  # how long it stays open before trial calls
    half_open_trials: int = Field(1, ge=1)  # calls let through while half-open


WorkerKind = Literal["echo", "openai", "anthropic", "llamacpp", "vllm"]


class WorkerConfig(_Strict):
    kind: WorkerKind
    base_url: str = ""
    api_key_env: str = ""  # name of the environment variable holding the key: secrets stay out of the file
    models: tuple[str, ...] = ()
    default_model: str = ""
    timeout_s: float = Field(60.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    max_connections: int = Field(100, ge=1)
    token_count: int = Field(16, ge=0, le=100_000)
    token_delay_ms: float = Field(0.0, ge=0)
    prompt_format: Literal["chatml", "plain"] = "chatml"
    retry: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    fallback: str = ""  # the worker that serves this one's requests while its circuit is open
    # What the provider charges, in USD per million tokens: the cost in each answer's done event.
    price_input_per_mtok: float = Field(0.0, ge=0)
    price_output_per_mtok: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _needs_url(self) -> WorkerConfig:
        if self.kind != "echo" and not self.base_url:
            raise ValueError(f"a {self.kind} worker needs base_url")
        if self.default_model and self.models and self.default_model not in self.models:
            raise ValueError("default_model must be one of models")
        return self

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


def _default_workers() -> dict[str, WorkerConfig]:
    return {"echo": WorkerConfig(kind="echo", models=("echo-1",))}


class PipelineSettings(_Strict):
    default_worker: str = "echo"
    workers: dict[str, WorkerConfig] = Field(default_factory=_default_workers)
    rag: RagConfig = RagConfig()
    assemble: AssembleConfig = AssembleConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    limits: LimitsConfig = LimitsConfig()
    tokenbus: TokenBusConfig = TokenBusConfig()
    rate_limits: RateLimitConfig = RateLimitConfig()
    dedup: DedupConfig = DedupConfig()
    batch: BatchConfig = BatchConfig()

    @model_validator(mode="after")
    def _default_exists(self) -> PipelineSettings:
        if self.default_worker not in self.workers:
            raise ValueError(f"default_worker {self.default_worker!r} is not among workers {sorted(self.workers)}")
        for name, worker in self.workers.items():
            if worker.fallback and (worker.fallback == name or worker.fallback not in self.workers):
                raise ValueError(f"workers.{name}.fallback must name another worker, got {worker.fallback!r}")
        if self.limits.default_max_tokens > self.limits.max_tokens_limit:
            raise ValueError("limits.default_max_tokens exceeds limits.max_tokens_limit")
        return self


def load_config(path: str | Path) -> PipelineSettings:
    """Read and validate ``pipeline.toml``; a missing file means all defaults."""
    file = Path(path)
    if not file.exists():
        return PipelineSettings()
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigInvalid(f"{file}: not valid TOML: {exc}", data={"path": str(file)}) from exc
    try:
        return PipelineSettings.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigInvalid(f"{file}: " + "; ".join(problems), data={"path": str(file), "errors": problems}) from exc


_lock = threading.Lock()
_cached: PipelineSettings | None = None


def get_config() -> PipelineSettings:
    """The process-wide config, loaded once from ``settings.PIPELINE_CONFIG_PATH``."""
    global _cached
    if _cached is None:
        from django.conf import settings

        with _lock:
            if _cached is None:
                _cached = load_config(settings.PIPELINE_CONFIG_PATH)
    return _cached


def set_config(config: PipelineSettings | None) -> None:
    """Replace (or with None, forget) the process-wide config. The hot-reload seam."""
    global _cached
    with _lock:
        _cached = config
