"""Route groups through the gateway: the API, the WebSocket and ``/v1`` say where a
request to a group went and why, with the real-time worker answering; budgets and
the board's figures move the choice as the rules say."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client import REGISTRY

from pipeline.services import budgets, routes
from pipeline.shared_redis import get_redis
from tests.conftest import Fakes, TenantFixture


def decisions(group: str, worker: str, reason: str) -> float:
    return REGISTRY.get_sample_value("orchestrator_route_decisions_total", {"group": group, "worker": worker, "reason": reason}) or 0.0


@pytest.fixture
def fresh_board(monkeypatch: pytest.MonkeyPatch) -> routes.RouteBoard:
    """The gateway's board, read now rather than within the second, and no thread."""
    board = routes.RouteBoard()
    monkeypatch.setattr(board, "following", lambda: board)
    monkeypatch.setattr(routes, "board", board)
    return board


@pytest.mark.django_db(transaction=True)
def test_every_decision_is_counted_by_group_worker_and_reason(owner: TenantFixture, session_fakes: Fakes, fresh_board: routes.RouteBoard) -> None:
    from pipeline.config import get_config

    config = get_config()
    tenant = str(owner.tenant.id)
    cases = [
        ({"prompt": "hi"}, "echo", "simple"),
        ({"prompt": "```\ncode\n```"}, "echo_priced", "complex"),
        ({"prompt": "hi", "latency_budget_ms": 50}, "echo", "latency_unmet"),
    ]
    for data, worker, reason in cases:
        before = decisions("auto", worker, reason)
        route = asyncio.run(routes.aroute(config, "auto", data, tenant_id=tenant, api_key_id=None))
        assert (route.worker, route.reason) == (worker, reason)
        assert decisions("auto", worker, reason) - before == 1
    assert asyncio.run(routes.aroute_if_grouped(config, {"prompt": "hi", "worker": "echo"}, tenant_id=tenant, api_key_id=None)) is None


@pytest.mark.django_db(transaction=True)
def test_through_the_api_a_short_prompt_runs_cheap_and_a_long_one_strong(owner: TenantFixture, realtime_worker: Any) -> None:
    before = decisions("auto", "echo", "simple")
    short = owner.client.post("/api/v1/infer", {"prompt": "hi there", "model": "auto", "max_tokens": 8}, format="json")
    assert short.status_code == 200, short.content
    assert (short.json()["worker"], short.json()["route"]) == ("echo", {"group": "auto", "worker": "echo", "model": "echo-1", "reason": "simple"})
    assert decisions("auto", "echo", "simple") - before == 1
    long = owner.client.post("/api/v1/infer", {"prompt": "please explain " + "this " * 20, "model": "auto", "max_tokens": 8}, format="json")
    assert (long.json()["worker"], long.json()["route"]["reason"]) == ("echo_priced", "complex")


@pytest.mark.django_db(transaction=True)
def test_through_the_api_a_budget_past_its_share_moves_to_the_cheap_candidate(owner: TenantFixture, realtime_worker: Any) -> None:
    import datetime as dt

    from pipeline.models import Budget, UsageEntry

    UsageEntry.objects.create(tenant=owner.tenant, request_id="r", worker="w", model="m", cost_usd=Decimal("0.9"), created_at=dt.datetime.now(tz=dt.UTC))
    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("1"), period="month")  # 90 % used
    body = {"prompt": "please explain " + "this " * 20, "model": "auto", "max_tokens": 8}
    answer = owner.client.post("/api/v1/infer", body, format="json")
    assert answer.status_code == 200 and answer.json()["route"] == {"group": "auto", "worker": "echo", "model": "echo-1", "reason": "budget"}


@pytest.mark.django_db(transaction=True)
def test_the_openai_api_and_a_stream_say_where_auto_went(owner: TenantFixture, realtime_worker: Any) -> None:
    from asgiref.sync import async_to_sync

    body = {"model": "auto", "messages": [{"role": "user", "content": "```py\nprint(1)\n```"}], "max_tokens": 8}
    answer = owner.client.post("/v1/chat/completions", body, format="json")
    assert answer.status_code == 200 and answer.json()["model"] == "echo_priced/echo-priced-1"
    streamed = owner.client.post("/api/v1/infer", {"prompt": "hi", "model": "auto", "max_tokens": 8, "stream": True}, format="json")

    async def drain() -> bytes:
        return b"".join([chunk async for chunk in streamed.streaming_content])

    start_event = async_to_sync(drain)().decode().split("\n\n")[0]
    assert '"route":{"group":"auto","worker":"echo","model":"echo-1","reason":"simple"}' in start_event.replace(" ", "")


@pytest.mark.django_db(transaction=True)
def test_through_the_api_a_latency_budget_takes_the_fastest_that_fits(owner: TenantFixture, realtime_worker: Any, fresh_board: routes.RouteBoard) -> None:
    shared = get_redis()
    pipe = shared.client.pipeline()
    for worker, seconds in (("echo", 0.5), ("echo_priced", 0.05)):
        pipe.delete(routes.ttft_key(shared.prefix, worker))
        routes.queue_ttft(pipe, shared.prefix, worker, seconds)
    pipe.execute()
    fresh_board.refresh()
    try:
        answer = owner.client.post("/api/v1/infer", {"prompt": "hi", "model": "auto", "max_tokens": 8, "latency_budget_ms": 100}, format="json")
        assert answer.status_code == 200 and answer.json()["route"]["worker"] == "echo_priced" and answer.json()["route"]["reason"] == "latency"
    finally:
        shared.client.delete(routes.ttft_key(shared.prefix, "echo"), routes.ttft_key(shared.prefix, "echo_priced"))


@pytest.mark.django_db(transaction=True)
def test_through_the_api_a_candidate_whose_provider_limits_us_is_passed_over(
    owner: TenantFixture, realtime_worker: Any, fresh_board: routes.RouteBoard
) -> None:
    routes.provider_limiting("echo_priced", 30.0)
    fresh_board.refresh()
    shared = get_redis()
    try:
        answer = owner.client.post("/api/v1/infer", {"prompt": "def f():\n    return 1", "model": "auto", "max_tokens": 8}, format="json")
        assert answer.status_code == 200 and answer.json()["route"] == {"group": "auto", "worker": "echo", "model": "echo-1", "reason": "availability"}
    finally:
        shared.client.delete(routes.limited_key(shared.prefix, "echo_priced"))


@pytest.mark.django_db(transaction=True)
def test_a_websocket_prompt_to_a_group_says_where_it_went(owner: TenantFixture, realtime_worker: Any) -> None:
    import json

    from asgiref.sync import async_to_sync
    from channels.testing import WebsocketCommunicator

    from orchestrator_site.asgi import application

    async def scenario() -> dict[str, Any]:
        ws = WebsocketCommunicator(application, "/api/v1/stream", headers=[(b"authorization", f"Bearer {owner.key}".encode())])
        await ws.connect(timeout=10)
        await ws.receive_from(timeout=10)  # authenticated
        await ws.send_to(text_data=json.dumps({"type": "prompt", "prompt": "hello", "model": "auto", "max_tokens": 8}))
        start = json.loads(await ws.receive_from(timeout=10))
        while json.loads(await ws.receive_from(timeout=15))["type"] not in ("done", "error"):
            pass
        await ws.disconnect()
        return start

    start = async_to_sync(scenario)()
    assert start["type"] == "start" and start["route"] == {"group": "auto", "worker": "echo", "model": "echo-1", "reason": "simple"}


@pytest.mark.django_db(transaction=True)
def test_a_routed_request_reserves_at_the_chosen_workers_prices(owner: TenantFixture, realtime_worker: Any) -> None:
    """A budget with nothing left: the group sends even a complex prompt to the free
    candidate (its share is past 80 %), which costs nothing and passes; named directly,
    the priced worker is refused."""
    from pipeline.models import Budget

    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("0"), period="day")
    body = {"prompt": "please explain " + "this " * 20, "max_tokens": 8}
    routed = owner.client.post("/api/v1/infer", {**body, "model": "auto"}, format="json")
    assert routed.status_code == 200 and routed.json()["route"]["reason"] == "budget" and routed.json()["worker"] == "echo"
    direct = owner.client.post("/api/v1/infer", {**body, "worker": "echo_priced"}, format="json")
    assert direct.status_code == 402 and direct.json()["error"]["code"] == "budget_exceeded"


@pytest.mark.django_db(transaction=True)
def test_a_session_budget_past_its_share_routes_that_session_only(owner: TenantFixture, realtime_worker: Any) -> None:
    import datetime as dt

    from pipeline.models import Budget, BudgetScope, UsageEntry

    UsageEntry.objects.create(
        tenant=owner.tenant, request_id="r", worker="w", model="m", session_id="tight", cost_usd=Decimal("0.85"), created_at=dt.datetime.now(tz=dt.UTC)
    )
    Budget.objects.create(tenant=owner.tenant, scope=BudgetScope.SESSION, session_id="tight", amount_usd=Decimal("1"), period="total")
    body = {"prompt": "please explain " + "this " * 20, "model": "auto", "max_tokens": 8}
    tight = owner.client.post("/api/v1/infer", {**body, "session_id": "tight"}, format="json").json()["route"]
    loose = owner.client.post("/api/v1/infer", {**body, "session_id": "loose"}, format="json").json()["route"]
    assert (tight["worker"], tight["reason"]) == ("echo", "budget")
    assert (loose["worker"], loose["reason"]) == ("echo_priced", "complex")


@pytest.mark.django_db(transaction=True)
def test_a_request_naming_a_worker_is_not_routed_and_says_no_route(owner: TenantFixture, realtime_worker: Any) -> None:
    answer = owner.client.post("/api/v1/infer", {"prompt": "hi", "worker": "echo", "max_tokens": 8}, format="json")
    assert answer.status_code == 200 and "route" not in answer.json()
    streamed = owner.client.post("/api/v1/infer", {"prompt": "hi", "worker": "echo", "max_tokens": 8, "stream": True}, format="json")
    from asgiref.sync import async_to_sync

    async def drain() -> bytes:
        return b"".join([chunk async for chunk in streamed.streaming_content])

    start_event = async_to_sync(drain)().decode().split("\n\n")[0]
    assert start_event.startswith("event: start") and "route" not in start_event


@pytest.mark.django_db(transaction=True)
def test_as_spend_rises_the_choice_moves_to_the_cheap_candidate_at_the_threshold(
    owner: TenantFixture, realtime_worker: Any, fresh_board: routes.RouteBoard
) -> None:
    """Long prompts to the group under a 0.05 USD budget, each answered by the strong
    (priced) candidate at 0.008 USD: the fifth request finds 0.032 spent (64 %), the
    sixth 0.040 (80 %) and goes to the cheap one, as does every one after."""
    from pipeline.models import Budget

    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("0.05"), period="day")
    body = {"prompt": "please explain " + "this " * 20, "model": "auto", "max_tokens": 8}
    chosen = []
    for _ in range(7):
        answer = owner.client.post("/api/v1/infer", body, format="json")
        assert answer.status_code == 200, answer.content
        chosen.append((answer.json()["worker"], answer.json()["route"]["reason"]))
        budget_figures = budgets.standings(Budget.objects.filter(tenant=owner.tenant))[0]
        deadline = time.monotonic() + 5
        while budget_figures.reserved_nano and time.monotonic() < deadline:  # the run settles after its answer
            time.sleep(0.02)
            budget_figures = budgets.standings(Budget.objects.filter(tenant=owner.tenant))[0]
    assert chosen == [("echo_priced", "complex")] * 5 + [("echo", "budget")] * 2
