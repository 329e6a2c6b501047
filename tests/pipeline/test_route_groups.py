"""Route groups (``routing.choose_in_group``): a table of named scenarios, each with its
inputs and the worker and reason expected; properties of the choice; the config's
checks of a group; and what the choice reads (``services.routes``) from the real
Redis. Through the gateway: test_route_groups_api.py."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orchestrator_site.errors import ConfigInvalid
from pipeline.config import PipelineSettings, RouteCandidate, RouteGroup, WorkerConfig, load_config
from pipeline.routing import Route, RouteInputs, RouteReason, choose_in_group, looks_like_code, names_a_group
from pipeline.services import gates, routes
from pipeline.shared_redis import get_redis
from tests.conftest import Fakes, TenantFixture

LONG = "x" * 2000


def priced(price: float, *models: str) -> WorkerConfig:
    return WorkerConfig(kind="echo", models=models or ("m",), price_input_per_mtok=price, price_output_per_mtok=price)


CONFIG = PipelineSettings(
    workers={"cheap": priced(1), "mid": priced(5, "m-small", "m-large"), "strong": priced(20)},
    routes={
        "auto": RouteGroup(candidates=(RouteCandidate(worker="strong"), RouteCandidate(worker="cheap"), RouteCandidate(worker="mid", model="m-large"))),
    },
    default_worker="cheap",
)
P95 = {"cheap": 500.0, "mid": 200.0, "strong": 250.0}

SCENARIOS: list[tuple[str, RouteInputs, str, RouteReason]] = [
    ("a short prompt goes to the cheapest", RouteInputs(prompt_chars=20), "cheap", RouteReason.SIMPLE),
    ("a long prompt goes to the strongest", RouteInputs(prompt_chars=2000), "strong", RouteReason.COMPLEX),
    ("code goes to the strongest, short as it is", RouteInputs(prompt_chars=30, has_code=True), "strong", RouteReason.COMPLEX),
    ("a budget past its share sends a long prompt to the cheapest", RouteInputs(prompt_chars=5000, budget_share=0.85), "cheap", RouteReason.BUDGET),
    ("exactly at the share counts as past it", RouteInputs(prompt_chars=5000, budget_share=0.8), "cheap", RouteReason.BUDGET),
    ("a budget under its share leaves the choice to the prompt", RouteInputs(prompt_chars=5000, budget_share=0.79), "strong", RouteReason.COMPLEX),
    ("a latency budget takes the fastest that fits", RouteInputs(latency_budget_ms=300, ttft_p95_ms=P95), "mid", RouteReason.LATENCY),
    ("a latency budget none fits takes the fastest there is", RouteInputs(latency_budget_ms=100, ttft_p95_ms=P95), "mid", RouteReason.LATENCY_UNMET),
    ("a latency budget beats the budget share", RouteInputs(latency_budget_ms=300, budget_share=0.95, ttft_p95_ms=P95), "mid", RouteReason.LATENCY),
    ("with no latency measured yet, the cheapest", RouteInputs(latency_budget_ms=300), "cheap", RouteReason.LATENCY_UNMET),
    ("an open circuit on the cheapest: the next cheapest", RouteInputs(prompt_chars=20, unavailable=frozenset({"cheap"})), "mid", RouteReason.AVAILABILITY),
    ("a limited strongest: the next strongest", RouteInputs(prompt_chars=2000, unavailable=frozenset({"strong"})), "mid", RouteReason.AVAILABILITY),
    (
        "the fastest that fits is down: the next that fits",
        RouteInputs(latency_budget_ms=300, ttft_p95_ms=P95, unavailable=frozenset({"mid"})),
        "strong",
        RouteReason.AVAILABILITY,
    ),
    (
        "every candidate down: the rules' own choice",
        RouteInputs(prompt_chars=20, unavailable=frozenset({"cheap", "mid", "strong"})),
        "cheap",
        RouteReason.SIMPLE,
    ),
]


@pytest.mark.parametrize(("scenario", "inputs", "worker", "reason"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_the_group_chooses(scenario: str, inputs: RouteInputs, worker: str, reason: RouteReason) -> None:
    route = choose_in_group(CONFIG, "auto", inputs)
    assert (route.worker, route.reason, route.group) == (worker, reason.value, "auto"), scenario


def test_a_candidate_runs_its_own_model_or_its_workers_default() -> None:
    assert choose_in_group(CONFIG, "auto", RouteInputs(prompt_chars=20, unavailable=frozenset({"cheap"}))).model == "m-large"
    assert choose_in_group(CONFIG, "auto", RouteInputs(prompt_chars=20)) == Route("cheap", "m", "auto", "simple")


def test_candidates_of_one_price_keep_the_files_order() -> None:
    config = PipelineSettings(
        workers={"a": priced(3), "b": priced(3)},
        routes={"g": RouteGroup(candidates=(RouteCandidate(worker="b"), RouteCandidate(worker="a")))},
        default_worker="a",
    )
    assert choose_in_group(config, "g", RouteInputs()).worker == "b"
    assert choose_in_group(config, "g", RouteInputs(prompt_chars=10**6)).worker == "a"  # the strongest: the last of equals


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("what is the capital of France?", False),
        ("```python\nprint(1)\n```", True),
        ("fix this:\ndef f(x):\n    return x", True),
        ("why does SELECT * FROM t fail", False),
        ("SELECT * FROM t WHERE id = 1;", True),
        ("const x = 1", True),
        ("a sentence; then another", False),
    ],
)
def test_code_is_told_from_prose(text: str, code: bool) -> None:
    assert looks_like_code(text) is code


def test_a_request_names_a_group_as_its_model_or_its_worker() -> None:
    assert names_a_group(CONFIG, worker=None, model="auto") == "auto"
    assert names_a_group(CONFIG, worker="auto", model=None) == "auto"
    assert names_a_group(CONFIG, worker="cheap", model="m") is None


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ('candidates = [{ worker = "nope" }]', 'routes.g.candidates.0.worker: "nope" is not a worker'),
        ('candidates = [{ worker = "echo", model = "gpt" }]', 'routes.g.candidates.0.model: "gpt" is not one of echo\'s models'),
        ("candidates = []", "routes.g.candidates"),
    ],
)
def test_a_group_naming_what_is_not_there_is_refused(tmp_path: Any, route: str, message: str) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text(f'[workers.echo]\nkind = "echo"\nmodels = ["echo-1"]\n\n[routes.g]\n{route}\n', encoding="utf-8")
    with pytest.raises(ConfigInvalid) as refused:
        load_config(path)
    assert any(message in p["path"] + ": " + p["message"] or message in p["message"] for p in refused.value.data["problems"]), refused.value.data


def test_a_group_named_as_a_worker_is_refused(tmp_path: Any) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text('[workers.echo]\nkind = "echo"\n\n[routes.echo]\ncandidates = [{ worker = "echo" }]\n', encoding="utf-8")
    with pytest.raises(ConfigInvalid) as refused:
        load_config(path)
    assert "a request naming it would be ambiguous" in str(refused.value.data["problems"])


# --- what the choice reads ------------------------------------------------------------


def test_the_p95_of_a_window_is_its_95th_percentile() -> None:
    assert routes.p95([float(v) for v in range(1, 101)]) == 95.0
    assert routes.p95([7.0]) == 7.0
    assert routes.p95([3.0, 1.0, 2.0]) == 3.0


def test_the_board_reads_latency_open_circuits_and_providers_limiting_us(session_fakes: Fakes, clean_breakers: None) -> None:
    from pipeline.config import get_config

    shared = get_redis()
    config = get_config()
    shared.client.delete(routes.ttft_key(shared.prefix, "echo"))  # earlier tests' answers
    pipe = shared.client.pipeline()
    for ms in range(1, 21):
        routes.queue_ttft(pipe, shared.prefix, "echo", ms / 1000)
    pipe.execute()
    routes.provider_limiting("anthropic", 30.0)
    gates.breaker_for(config, "flaky_alone").record(success=False)  # failure_threshold 1: open
    board = routes.RouteBoard()
    try:
        board.refresh(config)
        assert board.ttft_p95_ms["echo"] == 19.0
        assert {"anthropic", "flaky_alone"} <= board.unavailable and "echo" not in board.unavailable
        assert 29_000 < shared.client.pttl(routes.limited_key(shared.prefix, "anthropic")) <= 30_000
    finally:
        shared.client.delete(routes.ttft_key(shared.prefix, "echo"), routes.limited_key(shared.prefix, "anthropic"))


def test_the_latency_window_keeps_the_last_answers_only() -> None:
    shared = get_redis()
    worker = f"w{uuid.uuid4().hex[:6]}"
    pipe = shared.client.pipeline()
    for n in range(routes.TTFT_WINDOW + 50):
        routes.queue_ttft(pipe, shared.prefix, worker, n / 1000)
    pipe.execute()
    kept = shared.client.lrange(routes.ttft_key(shared.prefix, worker), 0, -1)
    shared.client.delete(routes.ttft_key(shared.prefix, worker))
    assert len(kept) == routes.TTFT_WINDOW and kept[0] == f"{routes.TTFT_WINDOW + 49:.1f}"


def test_a_provider_limiting_us_while_redis_is_down_is_only_logged(redis_down: None) -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        routes.provider_limiting("openai", None)
    assert [e["event"] for e in logs] == ["provider_limit_unrecorded"]


@pytest.mark.django_db(transaction=True)
def test_the_budget_share_is_the_most_used_budget_that_applies(owner: TenantFixture) -> None:
    import datetime as dt

    from pipeline.models import Budget, BudgetScope, UsageEntry

    share = asyncio.run(routes.abudget_share(tenant_id=str(owner.tenant.id), api_key_id=owner.issued.api_key.id, session_id="s"))
    assert share == 0.0  # no budget applies
    UsageEntry.objects.create(
        tenant=owner.tenant, request_id="r", worker="w", model="m", cost_usd=Decimal("0.3"), session_id="s", created_at=dt.datetime.now(tz=dt.UTC)
    )
    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("3"), period="day")  # 10 % used
    Budget.objects.create(tenant=owner.tenant, scope=BudgetScope.SESSION, session_id="s", amount_usd=Decimal("0.4"), period="total")  # 75 %
    share = asyncio.run(routes.abudget_share(tenant_id=str(owner.tenant.id), api_key_id=owner.issued.api_key.id, session_id="s"))
    assert share == 0.75
    Budget.objects.create(tenant=owner.tenant, scope=BudgetScope.KEY, api_key=owner.issued.api_key, amount_usd=Decimal("0"), period="day")
    assert asyncio.run(routes.abudget_share(tenant_id=str(owner.tenant.id), api_key_id=owner.issued.api_key.id, session_id="s")) == 1.0


def test_a_budget_share_redis_cannot_give_is_none(redis_down: None) -> None:
    assert asyncio.run(routes.abudget_share(tenant_id="t", api_key_id=None, session_id="s")) == 0.0


@pytest.mark.django_db(transaction=True)
def test_a_provider_429_marks_its_worker_for_the_route_groups_until_retry_after(owner: TenantFixture, fakes: Fakes) -> None:
    from pipeline.config import get_config
    from pipeline.services import start
    from tests.conftest import run_in_process

    fakes.openai.mode, fakes.openai.retry_after = "429", "7"
    shared = get_redis()
    request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "limited", "worker": "openai"}, config=get_config())
    run_in_process(request)
    try:
        assert 6_000 < shared.client.pttl(routes.limited_key(shared.prefix, "openai")) <= 7_000
    finally:
        shared.client.delete(routes.limited_key(shared.prefix, "openai"))


# --- properties of the choice, whatever the inputs -----------------------------------------

prices = st.lists(st.integers(0, 50), min_size=1, max_size=5)


def group_of(costs: list[int]) -> PipelineSettings:
    workers = {f"w{n}": priced(float(cost)) for n, cost in enumerate(costs)}
    return PipelineSettings(workers=workers, default_worker="w0", routes={"g": RouteGroup(candidates=tuple(RouteCandidate(worker=name) for name in workers))})


@hypothesis_settings(max_examples=200, deadline=None)
@given(
    costs=prices,
    chars=st.integers(0, 5000),
    code=st.booleans(),
    share=st.floats(0, 1),
    latency=st.none() | st.floats(1, 1000),
    data=st.data(),
)
def test_the_choice_keeps_every_rule(costs: list[int], chars: int, code: bool, share: float, latency: float | None, data: st.DataObject) -> None:
    config = group_of(costs)
    names = list(config.workers)
    p95 = {n: data.draw(st.floats(1, 1000)) for n in names if data.draw(st.booleans())}
    down = frozenset(n for n in names if data.draw(st.booleans()))
    inputs = RouteInputs(prompt_chars=chars, has_code=code, latency_budget_ms=latency, budget_share=share, ttft_p95_ms=p95, unavailable=down)
    route = choose_in_group(config, "g", inputs)
    price = {n: config.workers[n].price_input_per_mtok for n in names}
    up = [n for n in names if n not in down]
    assert route.worker in names and route.group == "g"
    if not up:
        return  # nobody can serve: the rules' choice, whatever its state
    assert route.worker in up  # one that can serve, if any can
    if route.reason == RouteReason.AVAILABILITY.value:
        return  # the rules' first choice was down: the next one by the same order
    if latency is not None:
        fitting = [n for n in up if n in p95 and p95[n] <= latency]
        if route.reason == RouteReason.LATENCY.value:
            assert route.worker in fitting and p95[route.worker] == min(p95[n] for n in fitting)
        else:
            assert route.reason == RouteReason.LATENCY_UNMET.value and not [n for n in names if n in p95 and p95[n] <= latency]
    elif route.reason == RouteReason.BUDGET.value:
        assert share >= 0.8 and price[route.worker] == min(price[n] for n in up)
    elif route.reason == RouteReason.COMPLEX.value:
        assert (chars >= 2000 or code) and price[route.worker] == max(price[n] for n in up)
    else:
        assert route.reason == RouteReason.SIMPLE.value and price[route.worker] == min(price[n] for n in up)


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ('candidates = [{ worker = "echo", model = "echo-1", weight = 2 }]', "weight"),
        ('candidates = [{ model = "echo-1" }]', "worker"),
        ('candidates = [{ worker = "echo" }]\ncheap_above_budget_share = 1.5', "cheap_above_budget_share"),
        ('candidates = [{ worker = "echo" }]\nlong_prompt_chars = 0', "long_prompt_chars"),
    ],
)
def test_a_group_of_the_wrong_shape_is_refused_naming_the_field(tmp_path: Any, route: str, message: str) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text(f'[workers.echo]\nkind = "echo"\nmodels = ["echo-1"]\n\n[routes.g]\n{route}\n', encoding="utf-8")
    with pytest.raises(ConfigInvalid) as refused:
        load_config(path)
    assert any(message in p["path"] for p in refused.value.data["problems"]), refused.value.data


# --- the board's thread ----------------------------------------------------------------------


def test_the_board_follows_in_one_thread_and_outlives_a_redis_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    from structlog.testing import capture_logs

    from orchestrator_site.errors import ServiceUnavailable

    reads: list[int] = []
    board = routes.RouteBoard(refresh_s=0.01)

    def refresh(config: Any = None) -> None:
        reads.append(1)
        if len(reads) == 1:
            raise ServiceUnavailable("redis down")

    monkeypatch.setattr(board, "refresh", refresh)
    with capture_logs() as logs:
        assert board.following() is board.following()  # one thread, however often asked
        deadline = time.monotonic() + 5
        while len(reads) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert [e["event"] for e in logs if e["event"] == "route_board_unread"] == ["route_board_unread"]
    assert sum(1 for t in threading.enumerate() if t.name == "route-board") >= 1


# --- the request's fields -------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("latency", [0, -5, 600_001, "fast"])
def test_a_latency_budget_that_is_no_positive_number_of_ms_is_a_400(owner: TenantFixture, latency: object) -> None:
    resp = owner.client.post("/api/v1/infer", {"prompt": "hi", "model": "auto", "latency_budget_ms": latency}, format="json")
    assert resp.status_code == 400 and "latency_budget_ms" in resp.json()["error"]["data"]["fields"]


# --- a routed request's record ---------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_run_adds_its_time_to_first_token_to_its_workers_window(owner: TenantFixture, fakes: Fakes) -> None:
    from pipeline.config import get_config
    from pipeline.services import start
    from tests.conftest import run_in_process

    shared = get_redis()
    shared.client.delete(routes.ttft_key(shared.prefix, "vllm"))
    request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "time me", "worker": "vllm"}, config=get_config())
    run_in_process(request)
    window = shared.client.lrange(routes.ttft_key(shared.prefix, "vllm"), 0, -1)
    shared.client.delete(routes.ttft_key(shared.prefix, "vllm"))
    assert len(window) == 1 and 0 <= float(window[0]) < 10_000  # milliseconds, from the gateway's acceptance


def test_a_requests_route_travels_with_it_to_the_worker() -> None:
    from pipeline.types import PromptRequest

    route = Route("echo", "echo-1", "auto", "simple")
    request = PromptRequest(request_id="r", tenant_id="t", session_id="r", prompt="p", worker="echo", model="echo-1", max_tokens=1, route=route.to_dict())
    assert PromptRequest.from_dict(request.to_dict()).route == {"group": "auto", "worker": "echo", "model": "echo-1", "reason": "simple"}
    plain = PromptRequest(request_id="r", tenant_id="t", session_id="r", prompt="p", worker="echo", model="echo-1", max_tokens=1)
    assert plain.to_dict()["route"] is None and PromptRequest.from_dict(plain.to_dict()).route is None


def test_identical_requests_to_a_group_share_one_deduplication_key() -> None:
    """The route is how the request was placed, not what it asks: two identical
    requests routed alike are one request to deduplication."""
    from pipeline.resilience.dedup import dedup_key
    from pipeline.types import PromptRequest

    base = {"tenant_id": "t", "session_id": "s", "prompt": "p", "worker": "echo", "model": "echo-1", "max_tokens": 1}
    routed = PromptRequest(request_id="r1", route=Route("echo", "echo-1", "auto", "simple").to_dict(), **base)
    again = PromptRequest(request_id="r2", route=Route("echo", "echo-1", "auto", "simple").to_dict(), **base)
    assert dedup_key(routed) == dedup_key(again)


@given(values=st.lists(st.floats(0, 10_000, allow_nan=False), min_size=1, max_size=300))
def test_the_p95_is_a_value_at_or_above_95_percent_of_them(values: list[float]) -> None:
    found = routes.p95(values)
    assert found in values
    assert sum(1 for v in values if v <= found) >= 0.95 * len(values)
    assert sum(1 for v in values if v < found) < 0.95 * len(values)  # and the least such value


def test_a_group_of_one_always_runs_it() -> None:
    config = PipelineSettings(workers={"only": priced(9)}, default_worker="only", routes={"solo": RouteGroup(candidates=(RouteCandidate(worker="only"),))})
    for inputs in (RouteInputs(), RouteInputs(prompt_chars=10**6), RouteInputs(budget_share=1.0), RouteInputs(unavailable=frozenset({"only"}))):
        assert choose_in_group(config, "solo", inputs).worker == "only"
    assert choose_in_group(config, "solo", RouteInputs(unavailable=frozenset({"only"}))).reason == "simple"  # not "availability": no other served


@pytest.mark.django_db
def test_a_model_that_is_neither_a_group_nor_a_model_is_refused_as_before(owner: TenantFixture) -> None:
    body = {"model": "auto-typo", "messages": [{"role": "user", "content": "hi"}]}
    resp = owner.client.post("/v1/chat/completions", body, format="json")
    assert resp.status_code == 400
    assert (resp.json()["error"]["code"], resp.json()["error"]["param"]) == ("model_not_found", "model")


def test_the_route_is_said_in_the_words_clients_read() -> None:
    assert Route("w", "m").to_dict() == {"group": "", "worker": "w", "model": "m", "reason": ""}
    assert [r.value for r in RouteReason] == ["availability", "latency", "latency_unmet", "budget", "complex", "simple"]


def test_a_new_or_changed_group_applies_live() -> None:
    """Routes are read per request: a version that adds or changes one needs no restart."""
    from pipeline.config.versions import breaking_changes

    changed = CONFIG.model_copy(update={"routes": {"auto": CONFIG.routes["auto"].model_copy(update={"long_prompt_chars": 10}), "more": CONFIG.routes["auto"]}})
    assert breaking_changes(CONFIG, changed, in_use={"cheap", "mid", "strong"}) == []
    assert choose_in_group(changed, "auto", RouteInputs(prompt_chars=10)).reason == "complex"
    assert choose_in_group(CONFIG, "auto", RouteInputs(prompt_chars=10)).reason == "simple"


def test_the_latency_budget_reaches_the_choice_as_milliseconds() -> None:
    from pipeline.api.inputs import InferInput, validated

    fields = validated(InferInput, {"prompt": "hi", "model": "auto", "latency_budget_ms": 150}).fields()
    assert fields["latency_budget_ms"] == 150.0 and fields["model"] == "auto"
    assert validated(InferInput, {"prompt": "hi"}).fields()["latency_budget_ms"] is None
    assert names_a_group(CONFIG, worker=fields.get("worker"), model=fields["model"]) == "auto"
    from orchestrator_site.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="latency_budget_ms"):
        validated(InferInput, {"prompt": "hi", "latency_budget_ms": 0})
