"""The stage context's guards, and history and search at their edges."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator_site.errors import StageOrderError
from pipeline import selectors
from pipeline.services import documents, sessions
from pipeline.stages.context import StageContext, require_completion, require_prompt
from pipeline.types import STAGES, AssembledPrompt, ChatMessage, Completion, PromptRequest
from tests.conftest import TenantFixture

REQUEST = PromptRequest(request_id="r", tenant_id="t", session_id="s", prompt="p", worker="w", model="m", max_tokens=5)


def test_context_starts_empty_and_is_frozen() -> None:
    ctx = StageContext(REQUEST)
    assert (ctx.documents, ctx.history, ctx.prompt, ctx.completion, ctx.output, ctx.rag_outcome) == ((), (), None, None, "", "skipped")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.output = "x"  # type: ignore[misc]


def test_guards_return_what_is_there_and_refuse_what_is_not() -> None:
    prompt = AssembledPrompt(messages=(ChatMessage("user", "p"),), model="m", max_tokens=5)
    completion = Completion(text="t", model="m", worker="w")
    ctx = StageContext(REQUEST, prompt=prompt, completion=completion)
    assert require_prompt(ctx) is prompt and require_completion(ctx) is completion
    with pytest.raises(StageOrderError, match="before assemble"):
        require_prompt(StageContext(REQUEST))
    with pytest.raises(StageOrderError, match="before inference"):
        require_completion(StageContext(REQUEST))


def test_stage_names_are_the_public_timing_keys() -> None:
    assert STAGES == ("rag", "assemble", "inference", "post", "stream")


@pytest.mark.django_db
def test_history_shorter_than_asked_is_returned_whole(owner: TenantFixture) -> None:
    request = PromptRequest(**{**REQUEST.to_dict(), "tenant_id": str(owner.tenant.id), "session_id": "short", "stop": ()})
    sessions.session_turns_append(request=request, reply="only answer")
    history = selectors.session_history(tenant_id=str(owner.tenant.id), session_id="short", turns=50)
    assert history == (ChatMessage("user", "p"), ChatMessage("assistant", "only answer"))
    assert selectors.session_history(tenant_id=str(owner.tenant.id), session_id="never-used", turns=5) == ()


@pytest.mark.django_db
def test_top_k_larger_than_the_library(owner: TenantFixture) -> None:
    documents.document_create(tenant=owner.tenant, title="Only doc", body="lonely refund")
    result = selectors.document_search(tenant_id=str(owner.tenant.id), query="refund", top_k=50, timeout_ms=1000, text_search_config="english")
    assert [d.title for d in result.documents] == ["Only doc"] and result.documents[0].rank > 0


@pytest.mark.django_db
def test_search_for_an_unknown_tenant_is_empty() -> None:
    result = selectors.document_search(tenant_id="00000000-0000-0000-0000-000000000000", query="refund", top_k=3, timeout_ms=1000, text_search_config="english")
    assert result.documents == () and not result.timed_out


@pytest.mark.django_db
def test_turns_store_the_request_id_for_tracing(owner: TenantFixture) -> None:
    request = PromptRequest(**{**REQUEST.to_dict(), "tenant_id": str(owner.tenant.id), "request_id": "req-abc", "stop": ()})
    sessions.session_turns_append(request=request, reply="a")
    assert set(owner.tenant.turns.values_list("request_id", "role")) == {("req-abc", "user"), ("req-abc", "assistant")}
