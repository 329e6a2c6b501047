"""Input parsing and validation before anything is enqueued."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batches.api.serializers import BatchInput
from orchestrator_site.errors import InvalidRequest, PromptMissing, PromptTooLarge
from pipeline.api.inputs import ChatCompletionInput, InferInput, validated
from pipeline.api.parsers import LimitedJSONParser, body_limit
from pipeline.api.serializers import validated as drf_validated
from pipeline.config import LimitsConfig, PipelineSettings


@pytest.fixture(autouse=True)
def small_limits(pipeline_config: object) -> None:
    pipeline_config(PipelineSettings(limits=LimitsConfig(max_prompt_chars=100, max_stop_sequences=2)))  # type: ignore[operator]


def test_body_limit_scales_with_the_prompt_limit() -> None:
    assert body_limit() == 100 * 6 + 64 * 1024


def test_parser_reads_json_within_the_limit() -> None:
    assert LimitedJSONParser().parse(io.BytesIO(b'{"prompt": "hi"}'), "application/json", {}) == {"prompt": "hi"}


def test_parser_refuses_a_body_over_the_limit_without_reading_it_all() -> None:
    stream = io.BytesIO(b"x" * (body_limit() + 10_000))
    with pytest.raises(PromptTooLarge):
        LimitedJSONParser().parse(stream, "application/json", {})
    assert stream.tell() == body_limit() + 1


def test_parser_reads_an_exactly_full_body() -> None:
    body = b'{"p": "' + b"y" * (body_limit() - 9) + b'"}'
    assert len(body) == body_limit()
    assert LimitedJSONParser().parse(io.BytesIO(body), "application/json", {})["p"].startswith("y")


def valid(data: dict) -> dict | None:
    """What was given and valid, with ``wait`` and ``stream`` always; None when refused."""
    try:
        model = validated(InferInput, data)
    except InvalidRequest:
        return None
    return model.model_dump(exclude_defaults=True) | {"wait": model.wait, "stream": model.stream}


def test_defaults() -> None:
    assert valid({"prompt": "hi"}) == {"prompt": "hi", "wait": True, "stream": False}
    assert validated(InferInput, {"prompt": "hi"}).fields() == {
        "prompt": "hi",
        "session_id": None,
        "worker": None,
        "model": None,
        "max_tokens": None,
        "temperature": None,
        "stop": [],
        "metadata": {},
        "dedup": True,
        "seed": None,
        "latency_budget_ms": None,
        "options": {},
    }


def test_prompt_at_and_over_the_limit() -> None:
    assert valid({"prompt": "x" * 100}) is not None
    with pytest.raises(PromptTooLarge, match="longer than 100 characters"):
        validated(InferInput, {"prompt": "x" * 101})


@pytest.mark.parametrize("body", [{}, {"prompt": None}, {"prompt": ""}, {"prompt": " \n\t"}, {"session_id": "s"}])
def test_a_missing_or_blank_prompt_is_prompt_missing(body: dict) -> None:
    with pytest.raises(PromptMissing):
        validated(InferInput, body)


def test_prompt_whitespace_is_kept() -> None:
    assert valid({"prompt": "  padded  "}) == {"prompt": "  padded  ", "wait": True, "stream": False}


def test_stop_limit_and_empty_stops_refused() -> None:
    assert valid({"prompt": "p", "stop": ["a", " "]}) == {"prompt": "p", "stop": ["a", " "], "wait": True, "stream": False}
    assert valid({"prompt": "p", "stop": ["a", ""]}) is None  # an empty stop sequence would stop at once
    assert valid({"prompt": "p", "stop": ["a", "b", "c"]}) is None


@given(st.from_regex(r"[A-Za-z0-9_.:@-]{1,128}", fullmatch=True))
def test_any_well_formed_session_id_is_accepted(session_id: str) -> None:
    assert valid({"prompt": "p", "session_id": session_id}) is not None


ALLOWED = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:@-")


# Surrounding whitespace is trimmed, as DRF's CharField did, so it is not "another character".
@given(st.text(min_size=1, max_size=40).filter(lambda s: not s.strip() or any(c not in ALLOWED for c in s.strip())))
def test_session_ids_with_other_characters_are_refused(session_id: str) -> None:
    assert valid({"prompt": "p", "session_id": session_id}) is None


@given(st.floats(0, 2))
def test_temperature_range(value: float) -> None:
    assert valid({"prompt": "p", "temperature": value}) is not None


@pytest.mark.parametrize("value", [-0.1, 2.01, "hot"])
def test_temperature_out_of_range(value: object) -> None:
    assert valid({"prompt": "p", "temperature": value}) is None


def test_null_temperature_means_provider_default() -> None:
    assert validated(InferInput, {"prompt": "p", "temperature": None}).temperature is None


def test_every_field_error_of_an_input_is_named_at_once() -> None:
    with pytest.raises(InvalidRequest) as refused:
        validated(InferInput, {"prompt": "ok", "max_tokens": 0, "temperature": 5, "stop": ["x" * 65], "wait": "sometimes"})
    assert refused.value.data["fields"] == {
        "max_tokens": ["Ensure this value is greater than or equal to 1."],
        "temperature": ["Ensure this value is less than or equal to 2.0."],
        "stop": ["0: Ensure this field has no more than 64 characters."],
        "wait": ["Must be a valid boolean."],
    }
    assert refused.value.message == "some fields are invalid: max_tokens, stop, temperature, wait"


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"prompt": "a\x00b"}, "prompt", "Value error, must not contain NUL characters"),
        ({"prompt": "bad \ud800"}, "prompt", "Value error, must not contain lone surrogates"),
        ({"prompt": ["a"]}, "prompt", "Not a valid string."),
        ({"prompt": "p", "metadata": [1]}, "metadata", "Expected a dictionary of items."),
        ({"prompt": "p", "max_tokens": "lots"}, "max_tokens", "A valid integer is required."),
        ({"prompt": "p", "stop": "END"}, "stop", "Expected a list of items."),
    ],
)
def test_what_cannot_be_stored_or_read_is_refused_by_name(body: dict, field: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        validated(InferInput, body)
    (got,) = refused.value.data["fields"][field]
    assert got == message.removeprefix("Value error, ")


def test_a_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(InvalidRequest) as refused:
        validated(InferInput, ["not", "an", "object"])
    assert refused.value.data == {"fields": {"non_field_errors": ["expected a JSON object"]}}


CHAT = {"model": "echo/m", "stream": True, "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}


def test_chat_messages_take_text_parts_and_refuse_the_rest() -> None:
    two = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
    assert [m.content for m in validated(ChatCompletionInput, {**CHAT, "messages": two}).messages] == ["be brief", "hi"]
    with pytest.raises(InvalidRequest) as refused:
        validated(ChatCompletionInput, {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert refused.value.data["fields"] == {"messages": ["0.content: content must be a string or a list of text parts"]}
    with pytest.raises(InvalidRequest) as refused:
        validated(ChatCompletionInput, {**CHAT, "messages": [{"role": "tool", "content": "x"}]})
    assert list(refused.value.data["fields"]) == ["messages"]
    with pytest.raises(InvalidRequest):
        validated(ChatCompletionInput, {**CHAT, "messages": []})


@pytest.mark.parametrize(("stop", "expected"), [(None, []), ("END", ["END"]), (["a", "b"], ["a", "b"])])
def test_chat_stop_forms(stop: object, expected: list[str]) -> None:
    assert validated(ChatCompletionInput, {**CHAT, "stop": stop}).stop == expected


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], [""], 7, [1]])
def test_chat_stops_it_cannot_honour_are_refused(stop: object) -> None:
    with pytest.raises(InvalidRequest) as refused:
        validated(ChatCompletionInput, {**CHAT, "stop": stop})
    assert refused.value.data["fields"] == {"stop": ["stop must be a string or a list of at most 4 strings"]}


def test_the_batch_api_validates_with_a_new_drf_serializer_each_time() -> None:
    assert drf_validated(BatchInput, {"prompts": ["a", "b"], "stop": ["END"]})["stop"] == ["END"]
    with pytest.raises(InvalidRequest) as refused:
        drf_validated(BatchInput, {"prompts": ["a"], "stop": 7})
    assert list(refused.value.data["fields"]) == ["stop"]
