"""A prompt longer than the model's window, through the pipeline and a real worker
process: each provider's refusal reaches the client as 400 context_length_exceeded
with the provider's numbers, on the platform's API and on the OpenAI one, and the
provider's circuit stays closed (it answered)."""

from __future__ import annotations

import pytest

from pipeline.config import get_config
from pipeline.resilience.breaker import BreakerState
from pipeline.services.gates import breaker_for
from tests.conftest import Fakes, TenantFixture, WorkerProcess

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

LONG = "word " * 40  # 40 of the fakes' tokens
CASES = {"openai": "openai", "anthropic": "anthropic", "llamacpp": "llamacpp", "vllm": "vllm"}


@pytest.mark.parametrize("worker", list(CASES))
def test_each_workers_context_refusal_is_the_clients_400(worker: str, owner: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes) -> None:
    getattr(fakes, worker).context_window = 16
    resp = owner.client.post("/api/v1/infer", {"prompt": LONG, "worker": worker, "max_tokens": 8}, format="json")
    assert resp.status_code == 400, resp.content
    error = resp.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["data"]["worker"] == worker
    assert error["data"]["context_tokens"] == 16 and error["data"]["requested_tokens"] > 16
    assert breaker_for(get_config(), worker).state() is BreakerState.CLOSED


def test_the_openai_api_answers_it_in_openais_words(owner: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes) -> None:
    fakes.vllm.context_window = 16
    resp = owner.client.post("/v1/chat/completions", {"model": "vllm", "messages": [{"role": "user", "content": LONG}], "max_tokens": 8}, format="json")
    assert resp.status_code == 400
    assert resp.json()["error"] == {
        "message": "vllm: the request is longer than the model's context window",
        "type": "invalid_request_error",
        "param": None,
        "code": "context_length_exceeded",
    }


def test_a_prompt_within_the_window_is_answered(owner: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes) -> None:
    fakes.openai.context_window = 1000
    resp = owner.client.post("/api/v1/infer", {"prompt": LONG, "worker": "openai"}, format="json")
    assert resp.status_code == 200 and resp.json()["text"] == "Hello, world!"
