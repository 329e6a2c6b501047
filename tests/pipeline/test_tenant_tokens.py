"""``orchestrator_tenant_tokens_total{tenant,worker,direction}``: the provider tokens of
every answer, by tenant with the label bounded (the top tenants by tokens, then
``other``), recorded where answers are settled: a real-time run, the gateway's own
run while Redis is down, a batch item. An answer served by deduplication called no
provider and counts nothing."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from pipeline import metrics
from pipeline.config import get_config
from pipeline.metrics import OTHER_TENANTS, TenantLabels
from pipeline.services import start
from pipeline.types import Usage
from tests.conftest import TenantFixture, run_in_process


@pytest.fixture(autouse=True)
def fresh_ranking(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's tenant ranking starts empty: the suite's other tests have spent
    tokens for many tenants, and a new one would count as other."""
    monkeypatch.setattr(metrics, "_tenant_labels", TenantLabels(limit=20))


def tokens(tenant: str, worker: str, direction: str) -> float:
    return REGISTRY.get_sample_value("orchestrator_tenant_tokens_total", {"tenant": tenant, "worker": worker, "direction": direction}) or 0.0


def test_the_top_tenants_have_their_own_label_and_the_rest_are_other() -> None:
    labels = TenantLabels(limit=2)
    assert [labels.label("a", 100), labels.label("b", 50)] == ["a", "b"]  # room for two
    assert labels.label("c", 10) == OTHER_TENANTS  # fewer than the smallest of the two
    assert labels.label("c", 30) == OTHER_TENANTS  # 40 < 50: still not among the top
    assert labels.label("c", 20) == "c"  # 60 > 50: it takes b's place
    assert labels.label("b", 1) == OTHER_TENANTS  # b, overtaken, counts as other now
    assert labels.label("a", 1) == "a"


@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 1000)), max_size=60), st.integers(1, 4))
def test_at_most_limit_tenants_are_counted_apart_at_any_time(answers: list[tuple[str, int]], limit: int) -> None:
    labels = TenantLabels(limit)
    seen: dict[str, int] = {}
    for tenant, count in answers:
        seen[tenant] = seen.get(tenant, 0) + count
        label = labels.label(tenant, count)
        current = {t for t in seen if labels.label(t, 0) != OTHER_TENANTS}
        assert len(current) <= limit
        if label != OTHER_TENANTS:
            # One with its own label has at least as many tokens as every tenant counted as other.
            assert all(seen[label] >= seen[t] for t in seen if t not in current)


def test_tokens_are_counted_by_direction_under_the_bounded_label() -> None:
    before = (tokens("tenant-x", "w", "input"), tokens("tenant-x", "w", "output"))
    metrics.tokens_used("tenant-x", "w", Usage(prompt_tokens=7, completion_tokens=3))
    assert (tokens("tenant-x", "w", "input") - before[0], tokens("tenant-x", "w", "output") - before[1]) == (7, 3)


@pytest.mark.django_db(transaction=True)
def test_a_real_time_answer_counts_its_tokens_and_a_dedup_hit_none(owner: TenantFixture, dedup_on: object) -> None:
    tenant = str(owner.tenant.id)
    request = start.infer_build_request(tenant_id=tenant, data={"prompt": "count these words", "temperature": 0}, config=get_config())
    before = (tokens(tenant, "echo", "input"), tokens(tenant, "echo", "output"))
    run_in_process(request)
    spent = (tokens(tenant, "echo", "input") - before[0], tokens(tenant, "echo", "output") - before[1])
    assert spent[0] >= 3 and spent[1] == get_config().workers["echo"].token_count
    again = start.infer_build_request(tenant_id=tenant, data={"prompt": "count these words", "temperature": 0}, config=get_config())
    started = asyncio.run(start.ainfer_start(request=again))
    assert started.result is not None  # answered from the deduplication window
    assert (tokens(tenant, "echo", "input") - before[0], tokens(tenant, "echo", "output") - before[1]) == spent


@pytest.mark.django_db
def test_a_batch_item_counts_its_tokens(owner: TenantFixture, fakes: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from batches.services import Prompt, batch_create, batch_run_chunk
    from batches.tasks import run_batch_chunk

    monkeypatch.setattr(run_batch_chunk, "apply_async", lambda *args, **kwargs: None)  # this test runs the chunk itself
    tenant = str(owner.tenant.id)
    job = batch_create(tenant=owner.tenant, data={"prompts": [Prompt("one two"), Prompt("three")], "worker": "openai"}, config=get_config())
    before = tokens(tenant, "openai", "output")
    batch_run_chunk(job_id=str(job.id), first=0, last=1)
    assert tokens(tenant, "openai", "output") - before == 2 * 4  # the fake's four tokens, per item


@pytest.mark.django_db
def test_the_gateways_own_run_counts_its_tokens(owner: TenantFixture) -> None:
    from pipeline.services import inline

    tenant = str(owner.tenant.id)
    request = start.infer_build_request(tenant_id=tenant, data={"prompt": "redis is down"}, config=get_config())
    before = tokens(tenant, "echo", "output")
    result = inline.infer_local(request=request)
    assert tokens(tenant, "echo", "output") - before == result.usage.completion_tokens > 0


def spend(tenant: str, worker: str, model: str) -> float:
    return REGISTRY.get_sample_value("orchestrator_spend_usd_total", {"tenant": tenant, "worker": worker, "model": model}) or 0.0


def test_a_cost_is_counted_by_tenant_worker_and_model_and_a_free_answer_not_at_all() -> None:
    before = spend("tenant-y", "w", "m")
    metrics.tokens_used("tenant-y", "w", Usage(1, 2), model="m", cost_usd=0.25)
    metrics.tokens_used("tenant-y", "w", Usage(1, 2), model="m")  # a worker without prices
    assert spend("tenant-y", "w", "m") - before == pytest.approx(0.25)
    assert REGISTRY.get_sample_value("orchestrator_spend_usd_total", {"tenant": "tenant-y", "worker": "w", "model": ""}) is None


@pytest.mark.django_db(transaction=True)
def test_every_place_an_answer_settles_counts_its_cost(owner: TenantFixture, fakes: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real-time run, the gateway's own run, and a batch item: the same cost, at the
    worker's prices, as the ledger records."""
    from decimal import Decimal

    from batches.services import Prompt, batch_create, batch_run_chunk
    from batches.tasks import run_batch_chunk
    from pipeline.models import UsageEntry
    from pipeline.services import inline

    monkeypatch.setattr(run_batch_chunk, "apply_async", lambda *args, **kwargs: None)
    tenant = str(owner.tenant.id)
    data = {"prompt": "priced", "worker": "echo_priced", "max_tokens": 8}
    before = spend(tenant, "echo_priced", "echo-priced-1")
    run_in_process(start.infer_build_request(tenant_id=tenant, data=data, config=get_config()))
    inline.infer_local(request=start.infer_build_request(tenant_id=tenant, data=data, config=get_config()))
    job = batch_create(tenant=owner.tenant, data={"prompts": [Prompt("priced")], "worker": "echo_priced", "max_tokens": 8}, config=get_config())
    batch_run_chunk(job_id=str(job.id), first=0, last=1)
    assert spend(tenant, "echo_priced", "echo-priced-1") - before == pytest.approx(3 * 0.008)
    assert sum(UsageEntry.objects.filter(tenant=owner.tenant).values_list("cost_usd", flat=True), Decimal(0)) == Decimal("0.024")
