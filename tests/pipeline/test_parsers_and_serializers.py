"""Input parsing and validation before anything is enqueued."""

from __future__ import annotations

import gc
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batches.api.serializers import BatchInput
from orchestrator_site.errors import InvalidRequest, PromptTooLarge
from pipeline.api import serializers
from pipeline.api.openai_compat import ChatCompletionInput
from pipeline.api.parsers import LimitedJSONParser, body_limit
from pipeline.api.serializers import InferInput, validated
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
    serializer = InferInput(data=data)
    return dict(serializer.validated_data) if serializer.is_valid() else None


def test_defaults() -> None:
    assert valid({"prompt": "hi"}) == {"prompt": "hi", "wait": True, "stream": False}


def test_prompt_at_and_over_the_limit() -> None:
    assert valid({"prompt": "x" * 100}) is not None
    serializer = InferInput(data={"prompt": "x" * 101})
    assert not serializer.is_valid() and serializer.errors["prompt"][0].code == "too_large"


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


# Surrounding whitespace is trimmed (DRF's CharField), so it is not "another character".
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
    assert valid({"prompt": "p", "temperature": None}) == {"prompt": "p", "temperature": None, "wait": True, "stream": False}


def test_infer_inputs_validated_side_by_side_keep_their_own_results() -> None:
    good = InferInput(data={"prompt": "hello", "stop": ["END"], "metadata": {"k": 1}, "max_tokens": 5})
    bad = InferInput(data={"prompt": "   ", "stop": ["x" * 65], "max_tokens": 0})
    _ = good.fields, bad.fields  # both bound before either validates
    assert bad.is_valid() is False and good.is_valid() is True
    assert good.validated_data == {"prompt": "hello", "stop": ["END"], "metadata": {"k": 1}, "max_tokens": 5, "wait": True, "stream": False}
    assert {field: [e.code for e in errors] if isinstance(errors, list) else errors for field, errors in bad.errors.items()} == {
        "prompt": ["blank"],
        "max_tokens": ["min_value"],
        "stop": {0: [bad.errors["stop"][0][0]]},
    }
    assert bad.errors["stop"][0][0].code == "max_length"
    again = InferInput(data={"prompt": "hello again"})
    assert again.is_valid() and again.validated_data["prompt"] == "hello again" and good.validated_data["prompt"] == "hello"


@pytest.fixture
def no_collector() -> Iterator[None]:
    """The cycle collector off, with nothing left over from before: what a test
    collects afterwards is what it made itself."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


CHAT = {"model": "echo/m", "stream": True, "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}
VALIDATIONS = [
    (InferInput, {"prompt": "hello", "stop": ["END"], "metadata": {"k": 1}, "max_tokens": 5}),
    (ChatCompletionInput, CHAT),
    (BatchInput, {"prompts": ["a", "b"], "stop": ["END"]}),
]


@pytest.mark.parametrize(("serializer_cls", "data"), VALIDATIONS, ids=["infer", "chat", "batch"])
def test_a_validation_leaves_nothing_for_the_cycle_collector(no_collector: None, serializer_cls: type[Any], data: object) -> None:
    """A new serializer's fields and their parent point at each other: each validation
    with a new one left 39 to 117 objects that only the collector frees (the gateway's
    collection pauses). The kept one leaves none. A refused input still does: DRF's
    own exceptions and frames hold each other on that path, which well-formed
    traffic never takes."""
    validated(serializer_cls, data)  # this thread's serializer made: kept, not garbage
    gc.collect()
    outcomes = [validated(serializer_cls, data) for _ in range(20)]
    assert gc.collect() == 0
    assert all(outcome == outcomes[0] for outcome in outcomes)  # the same answer every time


def kept(serializer_cls: type[Any]) -> Any:
    validated(serializer_cls, VALID[serializer_cls])
    return serializers._kept.serializers[serializer_cls]


VALID = dict(VALIDATIONS)


def test_one_serializer_per_class_and_thread_validates_every_input() -> None:
    mine = kept(InferInput)
    assert kept(InferInput) is mine and kept(ChatCompletionInput) is not mine
    with ThreadPoolExecutor(1) as other:
        assert other.submit(kept, InferInput).result() is not mine  # another thread: its own


@pytest.mark.parametrize(("serializer_cls", "data"), VALIDATIONS, ids=["infer", "chat", "batch"])
def test_nothing_of_an_input_stays_on_the_kept_serializer(serializer_cls: type[Any], data: dict[str, Any]) -> None:
    serializer = kept(serializer_cls)
    with pytest.raises(InvalidRequest):
        validated(serializer_cls, {**data, "stop": 7})  # refused: its errors are not kept either
    assert not {"initial_data", "_validated_data", "_errors"} & set(serializer.__dict__)


def test_each_input_is_answered_for_itself_whatever_came_before() -> None:
    full = {"prompt": "first", "stop": ["END"], "metadata": {"k": 1}, "max_tokens": 5, "session_id": "s"}
    assert validated(InferInput, full) == full | {"wait": True, "stream": False}
    assert validated(InferInput, {"prompt": "second"}) == {"prompt": "second", "wait": True, "stream": False}  # nothing of the first
    with pytest.raises(InvalidRequest) as refused:
        validated(InferInput, {"prompt": "ok", "max_tokens": 0, "temperature": 5})
    assert set(refused.value.data["fields"]) == {"max_tokens", "temperature"}
    with pytest.raises(InvalidRequest) as refused:
        validated(InferInput, {"prompt": "ok", "stop": ["x" * 65]})
    assert set(refused.value.data["fields"]) == {"stop"}  # not the last input's errors
    assert validated(InferInput, {"prompt": "third"})["prompt"] == "third"
    two = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert [m["content"] for m in validated(ChatCompletionInput, {**CHAT, "messages": two})["messages"]] == ["be brief", "hi"]
    assert [m["content"] for m in validated(ChatCompletionInput, CHAT)["messages"]] == ["hi"]  # a nested list, answered anew


def test_threads_validating_at_once_each_get_their_own_answers() -> None:
    def validate_many(n: int) -> list[bool]:
        return [
            validated(InferInput, {"prompt": f"{n}-{i}", "max_tokens": n + 1}) == {"prompt": f"{n}-{i}", "max_tokens": n + 1, "wait": True, "stream": False}
            for i in range(300)
        ]

    with ThreadPoolExecutor(8) as pool:
        assert all(all(answers) for answers in pool.map(validate_many, range(8)))
