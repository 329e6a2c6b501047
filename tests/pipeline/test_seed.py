"""``seed``: taken where the worker's provider honours it (openai, vllm, llamacpp; echo
ignores it), refused with ``unsupported_parameter`` where it does not (anthropic), part
of the dedup key, and a seeded request's answer is served again like temperature 0's."""

from __future__ import annotations

import pytest

from orchestrator_site.errors import UnsupportedParameter
from pipeline.config import PipelineSettings, get_config
from pipeline.services import start
from pipeline.types import DedupMode
from tests.conftest import Fakes, TenantFixture
from workers.base import WorkerSettings
from workers.llamacpp import LlamaCppWorker
from workers.openai import OpenAIWorker
from workers.types import AssembledPrompt, ChatMessage

PROMPT = AssembledPrompt(messages=(ChatMessage("user", "hi"),), model="m", max_tokens=4, seed=42)


def test_the_providers_that_take_a_seed_are_sent_it() -> None:
    openai = OpenAIWorker(WorkerSettings(name="o", kind="openai", base_url="http://127.0.0.1:9"))
    llama = LlamaCppWorker(WorkerSettings(name="l", kind="llamacpp", base_url="http://127.0.0.1:9"))
    assert openai.body(PROMPT, stream=False)["seed"] == 42 and llama.body(PROMPT, stream=True)["seed"] == 42
    unseeded = AssembledPrompt(messages=PROMPT.messages, model="m", max_tokens=4)
    assert "seed" not in openai.body(unseeded, stream=False) and "seed" not in llama.body(unseeded, stream=False)
    assert AssembledPrompt.from_dict(PROMPT.to_dict()) == PROMPT


@pytest.mark.django_db
def test_a_seeded_request_is_deterministic_and_keyed_by_its_seed(owner: TenantFixture, fakes: Fakes) -> None:
    config = get_config()
    seeded = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "p", "worker": "openai", "seed": 7, "temperature": 0.9}, config=config)
    assert seeded.seed == 7 and seeded.dedup is DedupMode.FULL
    from pipeline.resilience.dedup import dedup_key

    other = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "p", "worker": "openai", "seed": 8, "temperature": 0.9}, config=config)
    assert dedup_key(seeded) != dedup_key(other)
    assert start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "p", "seed": 1}, config=PipelineSettings()).seed == 1  # echo: accepted


@pytest.mark.django_db
def test_a_worker_that_cannot_honour_a_seed_refuses_it(owner: TenantFixture, fakes: Fakes) -> None:
    with pytest.raises(UnsupportedParameter) as info:
        start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "p", "worker": "anthropic", "seed": 3}, config=get_config())
    assert info.value.data == {"field": "seed", "fields": ["seed"], "worker": "anthropic"} and info.value.http_status == 400
    resp = owner.client.post("/api/v1/infer", {"prompt": "p", "worker": "anthropic", "seed": 3}, format="json")
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "unsupported_parameter"
    chat = owner.client.post("/v1/chat/completions", {"model": "anthropic", "messages": [{"role": "user", "content": "p"}], "seed": 3}, format="json")
    assert chat.status_code == 400 and (chat.json()["error"]["code"], chat.json()["error"]["param"]) == ("unsupported_parameter", "seed")


@pytest.mark.django_db
@pytest.mark.parametrize("seed", ["7", 1.5, True])
def test_a_seed_is_an_integer(owner: TenantFixture, seed: object) -> None:
    resp = owner.client.post("/api/v1/infer", {"prompt": "p", "seed": seed}, format="json")
    assert resp.status_code == 400 and "seed" in resp.json()["error"]["data"]["fields"]


@pytest.mark.django_db(transaction=True)
def test_the_seed_reaches_the_provider_through_the_stages(owner: TenantFixture, fakes: Fakes) -> None:
    from tests.conftest import run_in_process

    request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "seeded run", "worker": "openai", "seed": 11}, config=get_config())
    run_in_process(request)
    assert fakes.openai.requests[-1]["body"]["seed"] == 11
