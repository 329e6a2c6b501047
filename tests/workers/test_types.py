"""The value types are frozen and round-trip through JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.types import AssembledPrompt, ChatMessage, Completion, TokenChunk, Usage

text = st.text(max_size=40)
usage = st.builds(Usage, st.integers(0, 10**6), st.integers(0, 10**6))
message = st.builds(ChatMessage, st.sampled_from(["system", "user", "assistant"]), text)
prompts = st.builds(
    AssembledPrompt,
    messages=st.lists(message, max_size=5).map(tuple),
    model=text,
    max_tokens=st.integers(1, 10**5),
    temperature=st.none() | st.floats(0, 2),
    stop=st.lists(text, max_size=3).map(tuple),
    request_id=text,
)
completions = st.builds(Completion, text=text, model=text, worker=text, finish_reason=st.sampled_from(["stop", "length"]), usage=usage)
chunks = st.builds(TokenChunk, index=st.integers(0, 10**6), text=text, finish_reason=st.none() | st.sampled_from(["stop", "length"]), usage=st.none() | usage)


def via_json(obj: object) -> dict:
    return json.loads(json.dumps(obj.to_dict()))  # type: ignore[attr-defined]


@given(prompts)
def test_assembled_prompt_round_trip(value: AssembledPrompt) -> None:
    assert AssembledPrompt.from_dict(via_json(value)) == value


@given(completions)
def test_completion_round_trip(value: Completion) -> None:
    assert Completion.from_dict(via_json(value)) == value


@given(chunks)
def test_token_chunk_round_trip(value: TokenChunk) -> None:
    assert TokenChunk.from_dict(via_json(value)) == value
    assert value.is_final == (value.finish_reason is not None)


@given(usage)
def test_usage_total(value: Usage) -> None:
    assert value.to_dict()["total_tokens"] == value.prompt_tokens + value.completion_tokens == value.total_tokens


@pytest.mark.parametrize("obj", [Usage(), ChatMessage("user", "x"), TokenChunk(0, "x"), Completion("t", "m", "w")])
def test_frozen(obj: object) -> None:
    field = dataclasses.fields(obj)[0].name  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field, None)
