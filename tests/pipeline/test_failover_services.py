"""Where a failed-over answer goes on (``services.failover``): the group's other
candidates, then the fallback chain; never a worker tried, one that cannot continue,
or one whose circuit is open; the failed provider's breaker told at once; a budget's
reservation corrected to cover the fallback, or no move. Against the real Redis."""

from __future__ import annotations

from decimal import Decimal

import pytest

from pipeline.config import PipelineSettings
from pipeline.config.schema import BreakerConfig, RouteCandidate, RouteGroup, WorkerConfig
from pipeline.resilience.breaker import BreakerState
from pipeline.services import budgets, failover, gates
from pipeline.types import AssembledPrompt, ChatMessage, Leg, PromptRequest, Usage

REQUEST = PromptRequest(request_id="r-fo", tenant_id="t", session_id="s", prompt="go", worker="a", model="a-1", max_tokens=8)
PROMPT = AssembledPrompt(messages=(ChatMessage("user", "go"),), model="a-1", max_tokens=6, prefix="Hello,")


def worker(kind: str, *, fallback: str = "", price_out: float = 0.0, threshold: int = 5) -> WorkerConfig:
    return WorkerConfig(
        kind=kind,
        models=(f"{kind}-m",),
        base_url="http://127.0.0.1:1" if kind != "echo" else "",
        fallback=fallback,
        price_output_per_mtok=price_out,
        breaker=BreakerConfig(failure_threshold=threshold, open_s=60),
    )


def config_of(**workers: WorkerConfig) -> PipelineSettings:
    routes = {"grp": RouteGroup(candidates=(RouteCandidate(worker="a"), RouteCandidate(worker="g1", model="echo-m"), RouteCandidate(worker="g2")))}
    return PipelineSettings(default_worker="a", workers=workers, routes=routes)


CONFIG = config_of(
    a=worker("openai", fallback="b", threshold=1),
    b=worker("echo", fallback="c"),
    c=worker("anthropic"),
    g1=worker("echo"),
    g2=worker("vllm"),
    o=worker("openai"),
)


def cut(name: str) -> Leg:
    return Leg(name, f"{name}-m", Usage(10, 6), estimated=True, error="worker_connection_error")


def test_the_candidates_are_the_groups_others_then_the_fallback_chain() -> None:
    grouped = PromptRequest(**{**REQUEST.to_dict(), "route": {"group": "grp", "worker": "a", "model": "a-1", "reason": "simple"}})  # type: ignore[arg-type]
    assert list(failover.candidates(CONFIG, grouped, "a")) == [("a", "openai-m"), ("g1", "echo-m"), ("g2", "vllm-m"), ("b", "echo-m"), ("c", "anthropic-m")]
    assert list(failover.candidates(CONFIG, REQUEST, "a")) == [("b", "echo-m"), ("c", "anthropic-m")]
    assert list(failover.candidates(CONFIG, REQUEST, "c")) == []
    assert list(failover.candidates(CONFIG, REQUEST, "gone")) == []  # a worker no longer configured: nowhere


def test_the_first_candidate_that_can_go_on_is_chosen_and_the_failure_recorded(clean_breakers: None) -> None:
    plan = failover.planner(REQUEST, CONFIG)
    chosen = plan((cut("a"),), PROMPT)
    assert chosen is not None and chosen.worker.name == "b" and chosen.prompt.model == "echo-m"
    assert chosen.prompt.prefix == "Hello," and chosen.prompt.max_tokens == PROMPT.max_tokens
    assert gates.breaker_for(CONFIG, "a").state() is BreakerState.OPEN  # a's threshold is one failure


def test_tried_workers_and_open_circuits_are_passed_over(clean_breakers: None) -> None:
    plan = failover.planner(REQUEST, CONFIG)
    chosen = plan((cut("a"), cut("b")), PROMPT)  # b failed in its turn
    assert chosen is not None and chosen.worker.name == "c"
    gates.breaker_for(CONFIG, "c").record(success=False)
    for _ in range(5):
        gates.breaker_for(CONFIG, "c").record(success=False)
    assert plan((cut("a"), cut("b")), PROMPT) is None  # c's circuit is open: nowhere left


def test_a_worker_that_cannot_continue_is_passed_over(clean_breakers: None) -> None:
    config = config_of(a=worker("echo", fallback="o"), o=worker("openai", fallback="b"), b=worker("echo"), g1=worker("echo"), g2=worker("vllm"))
    chosen = failover.planner(REQUEST, config)((cut("a"),), PROMPT)
    assert chosen is not None and chosen.worker.name == "b"  # o (OpenAI) cannot continue a partial answer


def test_a_budget_that_cannot_cover_the_fallback_keeps_the_answer_where_it_is(owner_budget_key: str, clean_breakers: None) -> None:
    dear = config_of(a=worker("openai", fallback="b"), b=worker("echo", price_out=1_000_000), g1=worker("echo"), g2=worker("vllm"))
    assert failover.planner(REQUEST, dear, budget_key=owner_budget_key)((cut("a"),), PROMPT) is None
    cheap = config_of(a=worker("openai", fallback="b"), b=worker("echo"), g1=worker("echo"), g2=worker("vllm"))
    assert failover.planner(REQUEST, cheap, budget_key=owner_budget_key)((cut("a"),), PROMPT) is not None


@pytest.fixture
def owner_budget_key(owner: object, django_db_blocker: object) -> str:
    """A request's record with a reservation against a 1 USD budget of the owner's."""
    from pipeline.models import Budget
    from pipeline.resilience import budget as budget_store
    from pipeline.tokenbus import get_bus

    tenant = owner.tenant  # type: ignore[attr-defined]
    Budget.objects.create(tenant=tenant, amount_usd=Decimal("1"), period="total")
    budgets.rebuild(str(tenant.id))
    record_key = get_bus().record_key("r-fo-budget")
    reserved = budgets.store().reserve(tenant_id=str(tenant.id), record_key=record_key, api_key_id=None, session_id="s", amount=1000, now=0.0)
    assert isinstance(reserved, budget_store.Reserved) and reserved.budgets
    return record_key
