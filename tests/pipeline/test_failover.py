"""Mid-stream failover through the platform: the gateway, a real Celery worker and the
protocol-faithful fakes. The OpenAI fake drops its stream mid-answer; the worker's
fallback (an Anthropic worker) or the route group's next candidate continues it.
The client reads one answer with a ``failover`` event at the seam, and usage and
cost add up across both providers."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any

import httpx
import pytest
from asgiref.sync import async_to_sync
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import get_config
from pipeline.models import Budget, UsageEntry
from pipeline.routing import cost_usd
from pipeline.services import budgets, routes
from pipeline.shared_redis import get_redis
from pipeline.types import Usage
from tests.conftest import Fakes, TenantFixture, WorkerProcess
from tests.pipeline.test_streaming_sse import parse_sse
from tests.pipeline.test_streaming_ws import one_prompt

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

ANSWER = "Hello, world!"  # every fake's answer; the OpenAI fake drops after "Hello" and ","


@pytest.fixture(autouse=True)
def _worker(realtime_worker: WorkerProcess, fakes: Fakes, clean_breakers: None) -> None:
    """Every test here runs against the real worker process and the fakes, and the
    breakers its failovers told of failures are closed again after it."""


def stream(tenant: TenantFixture, path: str = "/api/v1/infer", **body: Any) -> list[dict[str, Any]]:
    response = tenant.client.post(path, {"max_tokens": 8, "dedup": False, **body, "stream": True}, format="json")
    assert response.status_code == 200, response.content

    async def drain() -> bytes:
        return b"".join([chunk async for chunk in response.streaming_content])

    text = async_to_sync(drain)().decode()
    if path.startswith("/v1/"):
        return [json.loads(line[len("data: ") :]) for line in text.split("\n\n") if line.startswith("data: {")]
    return parse_sse(text)


def failovers(worker: WorkerProcess, **labels: str) -> float:
    text = httpx.get(worker.metrics_url, timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "orchestrator_failovers_total" and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_a_drop_mid_stream_goes_on_on_the_fallback_as_one_answer(owner: TenantFixture, fakes: Fakes, realtime_worker: WorkerProcess) -> None:
    fakes.openai.mode = "drop"
    before = failovers(realtime_worker, from_worker="gpt_relay", to_worker="claude_relay")
    events = stream(owner, prompt="go on elsewhere", worker="gpt_relay")

    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("failover") == 1 and "error" not in kinds
    seam = kinds.index("failover")
    tokens = [e for e in events if e["type"] == "token"]
    assert "".join(t["text"] for t in tokens) == ANSWER
    assert "".join(e["text"] for e in events[:seam] if e["type"] == "token") == "Hello,"  # what the OpenAI fake sent before it dropped
    marker = events[seam]
    assert {k: marker[k] for k in ("from", "to", "model", "error")} == {
        "from": "gpt_relay",
        "to": "claude_relay",
        "model": "claude-relay",
        "error": "worker_connection_error",
    }
    assert [e["seq"] for e in events if e["type"] in ("token", "failover")] == list(range(len(tokens) + 1))  # one sequence across the seam
    # The fallback was given the answer so far as the assistant's turn to continue.
    assert fakes.anthropic.requests[-1]["body"]["messages"][-1] == {"role": "assistant", "content": "Hello,"}
    assert failovers(realtime_worker, from_worker="gpt_relay", to_worker="claude_relay") == before + 1


def test_the_first_tokens_time_counts_for_the_worker_that_sent_it(owner: TenantFixture, fakes: Fakes) -> None:
    """The route groups' latency window: the answer's TTFT was gpt_relay's, not its fallback's."""
    shared = get_redis()
    shared.client.delete(routes.ttft_key(shared.prefix, "gpt_relay"), routes.ttft_key(shared.prefix, "claude_relay"))
    fakes.openai.mode = "drop"
    assert stream(owner, prompt="whose first token", worker="gpt_relay")[-1]["type"] == "done"
    deadline = time.monotonic() + 5
    while not shared.client.llen(routes.ttft_key(shared.prefix, "gpt_relay")):  # pushed as the run settles, after the client's done
        assert time.monotonic() < deadline, "no TTFT recorded"
        time.sleep(0.02)
    assert shared.client.llen(routes.ttft_key(shared.prefix, "claude_relay")) == 0


def test_a_websocket_client_reads_the_failover_between_the_tokens(owner: TenantFixture, fakes: Fakes) -> None:
    fakes.openai.mode = "drop"
    events = one_prompt(owner.key, prompt="over the socket", worker="gpt_relay", max_tokens=8, dedup=False)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("failover") == 1
    seam = kinds.index("failover")
    assert "".join(e["text"] for e in events[:seam] if e["type"] == "token") == "Hello,"
    assert "".join(e["text"] for e in events if e["type"] == "token") == ANSWER and events[seam]["to"] == "claude_relay"


def test_usage_and_cost_add_up_across_both_providers(owner: TenantFixture, fakes: Fakes) -> None:
    fakes.openai.mode = "drop"
    done = stream(owner, prompt="count both", worker="gpt_relay")[-1]

    cut, answered = done["legs"]
    assert (cut["worker"], cut["estimated"], cut["error"]) == ("gpt_relay", True, "worker_connection_error")
    assert (answered["worker"], answered["model"], answered["estimated"], answered["error"]) == ("claude_relay", "claude-relay", False, None)
    assert answered["usage"]["completion_tokens"] == 2  # " world", "!": the Anthropic fake's own count
    assert cut["usage"]["completion_tokens"] == len(b"Hello,")  # cut before its usage: its bytes, a bound
    total = Usage.from_dict(cut["usage"]) + Usage.from_dict(answered["usage"])
    assert done["usage"] == total.to_dict()
    config = get_config()
    each = cost_usd(config, "gpt_relay", Usage.from_dict(cut["usage"])) + cost_usd(config, "claude_relay", Usage.from_dict(answered["usage"]))
    assert done["cost"] == pytest.approx(each) and each > cost_usd(config, "claude_relay", Usage.from_dict(answered["usage"]))
    assert (done["worker"], done["model"]) == ("claude_relay", "claude-relay")
    # The ledger's row is the answer's whole cost.
    deadline = time.monotonic() + 5
    while not (rows := list(UsageEntry.objects.filter(tenant=owner.tenant))):
        assert time.monotonic() < deadline, "no ledger row"
        time.sleep(0.02)
    (row,) = rows
    assert float(row.cost_usd) == pytest.approx(each) and (row.prompt_tokens, row.completion_tokens) == (total.prompt_tokens, total.completion_tokens)


def test_a_route_groups_next_candidate_continues_its_answer(owner: TenantFixture, fakes: Fakes) -> None:
    fakes.vllm.mode = "drop"
    events = stream(owner, prompt="group relay", model="relay")

    assert events[0]["route"]["worker"] == "vllm"
    (marker,) = [e for e in events if e["type"] == "failover"]
    assert (marker["from"], marker["to"]) == ("vllm", "llamacpp")
    assert "".join(e["text"] for e in events if e["type"] == "token") == ANSWER and events[-1]["type"] == "done"
    assert fakes.llamacpp.requests[-1]["body"]["prompt"].endswith("<|im_start|>assistant\nHello,")


def test_without_a_fallback_the_client_gets_worker_connection_error(owner: TenantFixture, fakes: Fakes) -> None:
    fakes.openai.mode = "drop"
    events = stream(owner, prompt="nowhere to go", worker="openai")
    assert events[-1]["type"] == "error" and events[-1]["code"] == "worker_connection_error"
    assert not any(e["type"] == "failover" for e in events) and any(e["type"] == "token" for e in events)


def test_a_whole_answer_fails_over_too(owner: TenantFixture, fakes: Fakes) -> None:
    """A client that waits for the whole answer gets it whole, from both providers."""
    fakes.openai.mode = "drop"
    response = owner.client.post("/api/v1/infer", {"prompt": "whole", "worker": "gpt_relay", "max_tokens": 8, "dedup": False}, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["text"] == ANSWER and [leg["worker"] for leg in body["legs"]] == ["gpt_relay", "claude_relay"]


def test_the_openai_stream_carries_the_failover_as_an_extension(owner: TenantFixture, fakes: Fakes) -> None:
    fakes.openai.mode = "drop"
    chunks = stream(owner, "/v1/chat/completions", model="gpt_relay", messages=[{"role": "user", "content": "sdk relay"}])
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c.get("choices"))
    assert text == ANSWER
    (marked,) = [c for c in chunks if "failover" in c]
    assert marked["failover"]["to"] == "claude_relay" and marked["choices"][0]["delta"] == {}


def test_a_budget_that_cannot_cover_the_fallback_keeps_the_providers_error(owner: TenantFixture, fakes: Fakes) -> None:
    """The reservation covers the dear fallback's worst case before it is called, or the
    answer does not move: 0.5 USD covers gpt_relay's worst case (about 0.2 USD at its
    prices), not that plus claude_relay's (about 0.6 more)."""
    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("0.5"), period="total")
    fakes.openai.mode = "drop"
    asked_before = len(fakes.anthropic.requests)
    events = stream(owner, prompt="too dear to move", worker="gpt_relay")
    assert events[-1]["type"] == "error" and events[-1]["code"] == "worker_connection_error"
    assert not any(e["type"] == "failover" for e in events)
    assert len(fakes.anthropic.requests) == asked_before  # the fallback was never called
    item.refresh_from_db()
    assert budgets.standings([item])[0].spent_nano <= budgets.limit_nano(item.amount_usd)


def test_a_budget_that_covers_the_fallback_is_charged_both_providers(owner: TenantFixture, fakes: Fakes) -> None:
    item = Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="total")
    fakes.openai.mode = "drop"
    done = stream(owner, prompt="dear but covered", worker="gpt_relay")[-1]
    assert done["type"] == "done" and len(done["legs"]) == 2
    deadline = time.monotonic() + 5
    while (now := budgets.standings([item])[0]).reserved_nano and time.monotonic() < deadline:
        time.sleep(0.02)
    assert now.reserved_nano == 0 and now.spent_nano == budgets.limit_nano(Decimal(str(done["cost"])))
