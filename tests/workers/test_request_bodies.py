"""The exact request each worker sends: the providers' documented fields, nothing else."""

from __future__ import annotations

import pytest

from workers.anthropic import AnthropicWorker
from workers.base import WorkerSettings
from workers.llamacpp import LlamaCppWorker
from workers.openai import OpenAIWorker
from workers.types import AssembledPrompt, ChatMessage
from workers.vllm import VllmWorker

FULL = AssembledPrompt(
    messages=(ChatMessage("system", "sys"), ChatMessage("user", "u1"), ChatMessage("assistant", "a1"), ChatMessage("user", "u2")),
    model="model-x",
    max_tokens=42,
    temperature=0.5,
    stop=("###", "END"),
)
MINIMAL = AssembledPrompt(messages=(ChatMessage("user", "only"),), model="model-y", max_tokens=1)


def make(cls: type, kind: str, **kw: object) -> object:
    return cls(WorkerSettings(name=kind, kind=kind, base_url="http://127.0.0.1:1", **kw))  # type: ignore[arg-type]


def test_openai_full_body() -> None:
    body = make(OpenAIWorker, "openai").body(FULL, stream=True)  # type: ignore[attr-defined]
    assert body == {
        "model": "model-x",
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"},
        ],
        "max_completion_tokens": 42,
        "stream": True,
        "temperature": 0.5,
        "stop": ["###", "END"],
        "stream_options": {"include_usage": True},
    }


def test_openai_minimal_body_omits_optional_fields() -> None:
    body = make(OpenAIWorker, "openai").body(MINIMAL, stream=False)  # type: ignore[attr-defined]
    assert body == {"model": "model-y", "messages": [{"role": "user", "content": "only"}], "max_completion_tokens": 1, "stream": False}


def test_vllm_uses_max_tokens() -> None:
    body = make(VllmWorker, "vllm").body(MINIMAL, stream=False)  # type: ignore[attr-defined]
    assert body["max_tokens"] == 1 and "max_completion_tokens" not in body


def test_anthropic_full_body() -> None:
    body = make(AnthropicWorker, "anthropic").body(FULL, stream=True)  # type: ignore[attr-defined]
    assert body == {
        "model": "model-x",
        "max_tokens": 42,
        "messages": [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}],
        "stream": True,
        "system": "sys",
        "temperature": 0.5,
        "stop_sequences": ["###", "END"],
    }


def test_anthropic_minimal_body() -> None:
    body = make(AnthropicWorker, "anthropic").body(MINIMAL, stream=False)  # type: ignore[attr-defined]
    assert body == {"model": "model-y", "max_tokens": 1, "messages": [{"role": "user", "content": "only"}], "stream": False}


def test_llamacpp_full_body() -> None:
    body = make(LlamaCppWorker, "llamacpp").body(FULL, stream=True)  # type: ignore[attr-defined]
    assert body["n_predict"] == 42 and body["stream"] is True and body["temperature"] == 0.5 and body["cache_prompt"] is True
    assert body["stop"] == ["###", "END", "<|im_end|>"]
    assert body["prompt"] == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nu2<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    ("cls", "kind", "header"),
    [
        (OpenAIWorker, "openai", "authorization"),
        (VllmWorker, "vllm", "authorization"),
        (LlamaCppWorker, "llamacpp", "authorization"),
        (AnthropicWorker, "anthropic", "x-api-key"),
    ],
)
def test_keys_travel_in_the_providers_header(cls: type, kind: str, header: str) -> None:
    with_key = make(cls, kind, api_key="secret-1")
    without = make(cls, kind)
    assert "secret-1" in with_key._http.sync.headers[header]  # type: ignore[attr-defined]
    assert header not in without._http.sync.headers  # type: ignore[attr-defined]
