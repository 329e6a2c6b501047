"""Deduplication that respects sampling: a finished answer is served again only to a
deterministic request (temperature 0, or echo's); identical requests in flight still
share one run; ``"dedup": false`` or ``Cache-Control: no-cache`` shares nothing."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.config import PipelineSettings
from pipeline.services import execute, start
from pipeline.services.start import StartKind, dedup_mode
from pipeline.types import DedupMode, PromptRequest
from tests.conftest import Fakes, TenantFixture, start_request


@pytest.mark.parametrize(
    ("wanted", "temperature", "kind", "mode"),
    [
        (True, 0.0, "openai", DedupMode.FULL),
        (True, 0, "anthropic", DedupMode.FULL),
        (True, None, "openai", DedupMode.IN_FLIGHT),  # no temperature: the provider samples
        (True, 0.7, "vllm", DedupMode.IN_FLIGHT),
        (True, None, "echo", DedupMode.FULL),  # echo answers the same every time
        (True, 1.5, "echo", DedupMode.FULL),
        (False, 0.0, "openai", DedupMode.OFF),
        (False, None, "echo", DedupMode.OFF),
    ],
)
def test_the_dedup_rule(wanted: bool, temperature: float | None, kind: str, mode: DedupMode) -> None:
    assert dedup_mode(wanted=wanted, temperature=temperature, kind=kind) is mode


def build(owner: TenantFixture, config: PipelineSettings, fresh: bool = False, **data: Any) -> PromptRequest:
    return start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "same", "session_id": "ds", **data}, config=config, fresh=fresh)


@pytest.mark.django_db
def test_a_request_carries_its_mode_across_processes(owner: TenantFixture, fakes: Fakes, dedup_on: PipelineSettings) -> None:
    assert build(owner, dedup_on, worker="openai", temperature=0.3).dedup is DedupMode.IN_FLIGHT
    assert build(owner, dedup_on, worker="openai", temperature=0).dedup is DedupMode.FULL
    assert build(owner, dedup_on, dedup=False).dedup is DedupMode.OFF
    assert build(owner, dedup_on, fresh=True).dedup is DedupMode.OFF
    request = build(owner, dedup_on, worker="openai")
    assert PromptRequest.from_dict(request.to_dict()).dedup is DedupMode.IN_FLIGHT
    assert PromptRequest.from_dict({**request.to_dict(), "dedup": None}).dedup is DedupMode.FULL  # a record of the version before


@pytest.mark.django_db(transaction=True)
def test_a_sampled_answer_is_shared_in_flight_and_never_served_again(
    owner: TenantFixture, dedup_on: PipelineSettings, unpublished: list[tuple[str, int]], fakes: Fakes
) -> None:
    first = build(owner, dedup_on, worker="openai", temperature=0.9)
    assert start_request(first).kind is StartKind.SUBMITTED
    joined = start_request(build(owner, dedup_on, worker="openai", temperature=0.9))
    assert (joined.kind, joined.request_id) == (StartKind.ATTACHED, first.request_id)  # one run for both in flight
    execute.realtime_execute(*unpublished[0])
    regenerate = start_request(build(owner, dedup_on, worker="openai", temperature=0.9))
    assert regenerate.kind is StartKind.SUBMITTED and regenerate.request_id != first.request_id  # a fresh sample
    assert len(unpublished) == 2


@pytest.mark.django_db(transaction=True)
def test_a_deterministic_answer_is_served_again(owner: TenantFixture, dedup_on: PipelineSettings, unpublished: list[tuple[str, int]], fakes: Fakes) -> None:
    first = build(owner, dedup_on, worker="openai", temperature=0)
    start_request(first)
    execute.realtime_execute(*unpublished[0])
    again = start_request(build(owner, dedup_on, worker="openai", temperature=0))
    assert again.kind is StartKind.CACHED and again.request_id == first.request_id and len(unpublished) == 1


@pytest.mark.django_db(transaction=True)
def test_a_request_that_opts_out_shares_nothing(owner: TenantFixture, dedup_on: PipelineSettings, unpublished: list[tuple[str, int]]) -> None:
    first = build(owner, dedup_on, dedup=False)
    assert start_request(first).kind is StartKind.SUBMITTED
    second = start_request(build(owner, dedup_on, fresh=True))
    assert second.kind is StartKind.SUBMITTED and second.request_id != first.request_id
    execute.realtime_execute(*unpublished[0])
    assert start_request(build(owner, dedup_on)).kind is StartKind.SUBMITTED  # and left nothing in the window


@pytest.mark.django_db
@pytest.mark.parametrize(("header", "fresh"), [("no-cache", True), ("no-store", True), ("max-age=0, No-Cache", True), ("max-age=60", False), (None, False)])
def test_cache_control_asks_for_a_fresh_answer(owner: TenantFixture, header: str | None, fresh: bool) -> None:
    from rest_framework.test import APIRequestFactory

    from pipeline.api.views import asks_for_a_fresh_answer

    factory = APIRequestFactory()
    raw = factory.post("/api/v1/infer", {}, format="json", **({"HTTP_CACHE_CONTROL": header} if header else {}))
    from rest_framework.request import Request

    assert asks_for_a_fresh_answer(Request(raw)) is fresh


@pytest.mark.django_db(transaction=True)
def test_the_endpoints_pass_the_opt_out_on(
    owner: TenantFixture, dedup_on: PipelineSettings, unpublished: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[PromptRequest] = []
    original = start.ainfer_start

    async def keep(*, request: PromptRequest, rates: Any = None) -> Any:
        seen.append(request)
        return await original(request=request, rates=rates)

    monkeypatch.setattr(start, "ainfer_start", keep)
    owner.client.post("/api/v1/infer", {"prompt": "a", "wait": False}, format="json", HTTP_CACHE_CONTROL="no-cache")
    owner.client.post("/api/v1/infer", {"prompt": "b", "wait": False, "dedup": False}, format="json")
    owner.client.post("/api/v1/infer", {"prompt": "c", "wait": False}, format="json")
    owner.client.post("/v1/chat/completions", {"model": "echo", "messages": [{"role": "user", "content": "d"}], "dedup": False, "stream": True}, format="json")
    assert [r.dedup for r in seen] == [DedupMode.OFF, DedupMode.OFF, DedupMode.FULL, DedupMode.OFF]
