"""Every bound of the config schema, at and past its edge."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.config import AssembleConfig, LimitsConfig, PipelineSettings, PostprocessConfig, RagConfig, RedactionPattern, TokenBusConfig, WorkerConfig


@pytest.mark.parametrize(
    ("model", "field", "ok", "bad"),
    [
        (RagConfig, "top_k", [1, 50], [0, 51]),
        (RagConfig, "max_context_chars", [0, 200_000], [-1, 200_001]),
        (RagConfig, "timeout_ms", [1, 60_000], [0, 60_001]),
        (RagConfig, "text_search_config", ["english", "simple"], ["English", "en glish", "x;drop"]),
        (AssembleConfig, "history_turns", [0, 200], [-1, 201]),
        (LimitsConfig, "max_prompt_chars", [1, 2_000_000], [0]),
        (LimitsConfig, "request_timeout_s", [0.1, 3600], [0, 3601]),
        (LimitsConfig, "max_stop_sequences", [0, 16], [-1, 17]),
        (TokenBusConfig, "maxlen", [10], [9]),
        (TokenBusConfig, "ttl_s", [10], [9]),
        (RedactionPattern, "max_length", [1, 4096], [0, 4097]),
    ],
)
def test_bounds(model: type, field: str, ok: list[object], bad: list[object]) -> None:
    base = {"name": "n", "pattern": "x"} if model is RedactionPattern else {}
    for value in ok:
        assert getattr(model(**base, **{field: value}), field) == value
    for value in bad:
        with pytest.raises(ValidationError):
            model(**base, **{field: value})


@pytest.mark.parametrize("kind", ["openai", "anthropic", "llamacpp", "vllm"])
def test_http_workers_need_a_base_url(kind: str) -> None:
    with pytest.raises(ValidationError, match="needs base_url"):
        PipelineSettings(default_worker="w", workers={"w": WorkerConfig(kind=kind)})  # type: ignore[arg-type]
    assert WorkerConfig(kind=kind, base_url="http://x").model_default == kind  # type: ignore[arg-type]


def test_worker_timeouts_must_be_positive() -> None:
    for field in ("timeout_s", "connect_timeout_s"):
        with pytest.raises(ValidationError):
            WorkerConfig(kind="echo", **{field: 0})
    with pytest.raises(ValidationError):
        WorkerConfig(kind="echo", prompt_format="alpaca")  # type: ignore[arg-type]


def test_unknown_keys_are_refused_at_every_level() -> None:
    for model in (RagConfig, AssembleConfig, PostprocessConfig, LimitsConfig, TokenBusConfig, PipelineSettings):
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            model(typo=1)
    with pytest.raises(ValidationError):
        WorkerConfig(kind="echo", base_ulr="http://x")  # type: ignore[call-arg]


def test_templates_with_only_their_own_placeholders() -> None:
    assert AssembleConfig(context_template="no placeholder at all").context_template == "no placeholder at all"
    assert AssembleConfig(document_template="{body} / {title}").document_template == "{body} / {title}"
    with pytest.raises(ValidationError):
        AssembleConfig(document_template="{title} {author}")
    with pytest.raises(ValidationError):
        AssembleConfig(context_template="{0}")


def test_token_delay_is_converted_to_seconds() -> None:
    assert WorkerConfig(kind="echo", token_delay_ms=25).settings("e").token_delay_s == 0.025


def test_the_default_config_validates_against_itself() -> None:
    data = PipelineSettings().model_dump()
    assert PipelineSettings.model_validate(data) == PipelineSettings()
