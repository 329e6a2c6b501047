from __future__ import annotations

import pytest

from orchestrator_site.errors import ConfigInvalid
from workers.anthropic import AnthropicWorker
from workers.base import ModelWorker, StreamingModelWorker, WorkerSettings
from workers.echo import EchoWorker
from workers.llamacpp import LlamaCppWorker, render_prompt
from workers.openai import OpenAIWorker
from workers.registry import WORKER_KINDS, build_worker
from workers.types import ChatMessage
from workers.vllm import VllmWorker


@pytest.mark.parametrize(
    ("kind", "klass"), [("echo", EchoWorker), ("openai", OpenAIWorker), ("anthropic", AnthropicWorker), ("llamacpp", LlamaCppWorker), ("vllm", VllmWorker)]
)
def test_each_kind_builds_a_streaming_worker(kind: str, klass: type) -> None:
    worker = build_worker(WorkerSettings(name=f"my-{kind}", kind=kind, base_url="http://127.0.0.1:1"))
    assert type(worker) is klass and worker.name == f"my-{kind}"
    assert isinstance(worker, ModelWorker) and isinstance(worker, StreamingModelWorker)
    assert worker.supports_streaming


def test_unknown_kind_is_a_config_error() -> None:
    with pytest.raises(ConfigInvalid) as info:
        build_worker(WorkerSettings(name="x", kind="bard"))
    assert info.value.data["kinds"] == sorted(WORKER_KINDS)


def test_chatml_rendering() -> None:
    messages = (ChatMessage("system", "S"), ChatMessage("user", "U"))
    assert render_prompt(messages, "chatml") == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(messages, "plain") == "system: S\n\nuser: U\n\nassistant:"


def test_anthropic_temperature_is_capped_at_one() -> None:
    from workers.types import AssembledPrompt

    worker = AnthropicWorker(WorkerSettings(name="a", kind="anthropic", base_url="http://x"))
    body = worker.body(AssembledPrompt(messages=(ChatMessage("user", "u"),), model="m", max_tokens=5, temperature=1.7), stream=False)
    assert body["temperature"] == 1.0 and "system" not in body


def test_each_kind_says_which_optional_fields_it_refuses() -> None:
    from workers.registry import WORKER_KINDS, refused

    asked = ["seed", "top_p", "logit_bias", "user", "tools", "logprobs", "response_format"]
    assert {kind: refused(kind, asked) for kind in WORKER_KINDS} == {
        "echo": ["logprobs", "response_format", "tools"],
        "openai": [],
        "vllm": [],
        "anthropic": ["logit_bias", "logprobs", "response_format", "seed"],
        "llamacpp": ["logprobs", "tools"],
    }
    assert refused("no-such-kind", ["top_p"]) == ["top_p"]
