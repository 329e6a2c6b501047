"""Request/result types round-trip through JSON; the models carry the indexes the queries need."""

from __future__ import annotations

import json

import pytest
from django.db import connection
from hypothesis import given
from hypothesis import strategies as st

from pipeline.models import ApiKey, Document, SessionTurn, Tenant
from pipeline.types import STAGES, ChatMessage, GenerationOptions, PipelineResult, PromptRequest, Source, ToolCall, Usage
from tests.conftest import TenantFixture

# A result's fields, in the order of its JSON (POST /api/v1/infer's body).
RESULT_FIELDS = ["request_id", "session_id", "status", "text", "worker", "model", "finish_reason", "usage", "timings_us", "sources", "tool_calls", "logprobs"]
text = st.text(max_size=30)
tool_calls = st.lists(st.builds(ToolCall, id=text, name=text, arguments=text), max_size=2).map(tuple)
messages = st.builds(ChatMessage, role=st.sampled_from(["user", "assistant", "tool"]), content=text, tool_calls=tool_calls, tool_call_id=text)
options = st.builds(
    GenerationOptions,
    top_p=st.none() | st.floats(0, 1),
    logit_bias=st.none() | st.dictionaries(st.integers(0, 10**6).map(str), st.floats(-100, 100), min_size=1, max_size=2),
    user=st.none() | text,
    tools=st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({"name": text})}), max_size=2).map(tuple),
    tool_choice=st.none() | st.sampled_from(["auto", "none", "required"]),
)
requests = st.builds(
    PromptRequest,
    request_id=text,
    tenant_id=text,
    session_id=text,
    prompt=text,
    worker=text,
    model=text,
    max_tokens=st.integers(1, 10**6),
    temperature=st.none() | st.floats(0, 2),
    stop=st.lists(text, max_size=4).map(tuple),
    metadata=st.dictionaries(text, st.integers() | text, max_size=3),
    history=st.lists(messages, max_size=3).map(tuple),
    tool_turns=st.lists(messages, max_size=3).map(tuple),
    options=options,
)
results = st.builds(
    PipelineResult,
    request_id=text,
    session_id=text,
    text=text,
    worker=text,
    model=text,
    finish_reason=st.sampled_from(["stop", "length"]),
    usage=st.builds(Usage, st.integers(0, 10**6), st.integers(0, 10**6)),
    timings_us=st.fixed_dictionaries({s: st.integers(0, 10**9) for s in STAGES}),
    status=st.just("completed"),
    sources=st.lists(st.builds(Source, id=text, title=text, rank=st.integers(1, 50), score=st.floats(0, 1)), max_size=3).map(tuple),
    tool_calls=tool_calls,
    logprobs=st.none() | st.lists(st.fixed_dictionaries({"token": text, "logprob": st.floats(-10, 0)}), max_size=2).map(tuple),
)


@given(requests)
def test_prompt_request_round_trips(request: PromptRequest) -> None:
    assert PromptRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request


@given(results)
def test_pipeline_result_round_trips(result: PipelineResult) -> None:
    data = json.loads(json.dumps(result.to_dict()))
    assert PipelineResult.from_dict(data) == result
    assert list(data) == RESULT_FIELDS


def test_prompt_request_from_partial_dict_fills_optionals() -> None:
    request = PromptRequest.from_dict({"request_id": "r", "tenant_id": "t", "session_id": "s", "prompt": "p", "worker": "w", "model": "m", "max_tokens": "5"})
    assert request.max_tokens == 5 and request.stop == () and request.temperature is None and dict(request.metadata) == {}


def test_a_request_names_a_session_only_when_its_session_is_not_its_own_id() -> None:
    unnamed = PromptRequest(request_id="r1", tenant_id="t", session_id="r1", prompt="p", worker="w", model="m", max_tokens=5)
    named = PromptRequest(request_id="r2", tenant_id="t", session_id="chat-7", prompt="p", worker="w", model="m", max_tokens=5)
    assert not unnamed.names_session and named.names_session


def test_prompt_request_missing_field_raises_key_error() -> None:
    with pytest.raises(KeyError):
        PromptRequest.from_dict({"request_id": "r"})


def index_names(table: str) -> dict[str, str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", [table])
        return dict(cursor.fetchall())


@pytest.mark.django_db
def test_documents_have_a_gin_index_on_a_generated_search_vector() -> None:
    indexes = index_names("pipeline_document")
    assert "USING gin (search_vector)" in indexes["document_search_gin"]
    with connection.cursor() as cursor:
        cursor.execute("SELECT is_generated FROM information_schema.columns WHERE table_name = 'pipeline_document' AND column_name = 'search_vector'")
        assert cursor.fetchone() == ("ALWAYS",)


@pytest.mark.django_db
def test_keys_are_looked_up_by_a_unique_hash_index() -> None:
    assert any("UNIQUE" in d and "(key_hash)" in d for d in index_names("pipeline_apikey").values())


@pytest.mark.django_db
def test_session_turns_have_a_recent_first_index() -> None:
    assert "(tenant_id, session_id, id DESC)" in index_names("pipeline_sessionturn")["turn_session_recent"]


@pytest.mark.django_db
def test_string_forms_for_the_admin(owner: TenantFixture) -> None:
    key = owner.issued.api_key
    assert str(owner.tenant) == "owner"
    assert str(key) == f"{key.prefix}… (owner)" and not key.is_revoked
    doc = Document.objects.create(tenant=owner.tenant, title="T", body="b")
    turn = SessionTurn.objects.create(tenant=owner.tenant, session_id="s", request_id="r", role="user", content="c")
    assert str(doc) == "T" and str(turn) == "s:user"


@pytest.mark.django_db
def test_deleting_a_tenant_deletes_what_it_owns(owner: TenantFixture, outsider: TenantFixture) -> None:
    Document.objects.create(tenant=owner.tenant, title="T", body="b")
    Document.objects.create(tenant=outsider.tenant, title="O", body="b")
    Tenant.objects.filter(pk=owner.tenant.pk).delete()
    assert ApiKey.objects.filter(tenant_id=owner.tenant.pk).count() == 0
    assert list(Document.objects.values_list("title", flat=True)) == ["O"]


@pytest.mark.django_db
def test_tenant_names_are_unique(owner: TenantFixture) -> None:
    from django.db import IntegrityError, transaction

    with pytest.raises(IntegrityError), transaction.atomic():
        Tenant.objects.create(name="owner")
