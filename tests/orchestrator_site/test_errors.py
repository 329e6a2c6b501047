"""The error tree: stable codes, HTTP and WebSocket mappings, and the wire form."""

from __future__ import annotations

import pytest

from orchestrator_site import errors
from orchestrator_site.errors import OrchestratorError, all_error_classes, error_class_for_code


def test_every_code_is_unique() -> None:
    codes = [k.code for k in all_error_classes()]
    assert len(codes) == len(set(codes))


@pytest.mark.parametrize("klass", all_error_classes(), ids=lambda k: k.__name__)
def test_every_class_has_consistent_mappings(klass: type[OrchestratorError]) -> None:
    assert klass.code and klass.code == klass.code.lower()
    assert 400 <= klass.http_status <= 599
    assert 4000 <= klass.ws_close_code <= 4999
    # The WebSocket close code mirrors the HTTP status where one exists.
    assert klass.ws_close_code - 4000 in (klass.http_status, 500)


@pytest.mark.parametrize("klass", all_error_classes(), ids=lambda k: k.__name__)
def test_wire_form_round_trips(klass: type[OrchestratorError]) -> None:
    original = klass("boom", data={"worker": "w1"}, retry_after=2.5)
    rebuilt = OrchestratorError.from_dict(original.to_dict())
    assert type(rebuilt) is klass
    assert rebuilt.message == "boom" and rebuilt.data == {"worker": "w1"} and rebuilt.retry_after == 2.5


def test_to_dict_shape() -> None:
    body = errors.WorkerRateLimited(data={"worker": "openai"}, retry_after=3).to_dict()
    assert body == {"code": "worker_rate_limited", "message": "the model provider is rate limiting", "data": {"worker": "openai", "retry_after": 3}}


def test_default_message_and_no_retry_after_key() -> None:
    body = errors.NotFound().to_dict()
    assert body == {"code": "not_found", "message": "not found", "data": {}}


def test_unknown_code_rebuilds_as_root() -> None:
    rebuilt = OrchestratorError.from_dict({"code": "from_the_future", "message": "x"})
    assert type(rebuilt) is OrchestratorError and rebuilt.message == "x"
    assert error_class_for_code("nope") is OrchestratorError


def test_from_dict_tolerates_missing_fields_and_bad_retry_after() -> None:
    rebuilt = OrchestratorError.from_dict({"code": "worker_timeout", "data": {"retry_after": "soon"}})
    assert isinstance(rebuilt, errors.WorkerTimeout)
    assert rebuilt.retry_after is None and rebuilt.message == errors.WorkerTimeout.default_message


def test_transient_worker_errors_are_retryable_and_permanent_are_not() -> None:
    for klass in all_error_classes():
        if issubclass(klass, errors.TransientWorkerError):
            assert klass.retryable
        if issubclass(klass, errors.PermanentWorkerError):
            assert not klass.retryable


def test_tree_is_drawn_in_the_module_docstring() -> None:
    doc = errors.__doc__ or ""
    for klass in all_error_classes():
        assert klass.__name__ in doc and klass.code in doc, klass.__name__


def test_specific_statuses() -> None:
    assert errors.PromptTooLarge.http_status == 413
    assert errors.UnsupportedMediaType.http_status == 415
    assert errors.WorkerRateLimited.http_status == 429
    assert errors.ApiKeyRevoked.http_status == 401
    # 402 Payment Required: the budget, not the request, is what must change.
    assert (errors.BudgetExceeded.http_status, errors.BudgetExceeded.ws_close_code, errors.BudgetExceeded.retryable) == (402, 4402, False)
    assert issubclass(errors.PromptMissing, errors.InvalidRequest)


from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda v: st.lists(v, max_size=3) | st.dictionaries(st.text(max_size=5), v, max_size=3),
    max_leaves=8,
)


@given(
    klass=st.sampled_from(all_error_classes()),
    message=st.text(min_size=1, max_size=40),
    data=st.dictionaries(st.text(max_size=8).filter(lambda k: k != "retry_after"), json_values, max_size=4),
    retry_after=st.none() | st.floats(0, 3600),
)
def test_any_error_survives_the_trip_through_json(klass: type[OrchestratorError], message: str, data: dict, retry_after: float | None) -> None:
    import json

    original = klass(message, data=data, retry_after=retry_after)
    rebuilt = OrchestratorError.from_dict(json.loads(json.dumps(original.to_dict())))
    assert (type(rebuilt), rebuilt.message, rebuilt.data, rebuilt.retry_after) == (klass, message, data, retry_after)


def test_tree_order_is_root_first_and_every_code_resolves() -> None:
    classes = all_error_classes()
    assert classes[0] is OrchestratorError
    for klass in classes:
        assert error_class_for_code(klass.code) is klass
        assert issubclass(klass, OrchestratorError)


def test_categories_group_their_members() -> None:
    assert {k.code for k in all_error_classes() if issubclass(k, errors.AuthenticationFailed)} == {
        "authentication_failed",
        "api_key_missing",
        "api_key_invalid",
        "api_key_revoked",
    }
    assert {k.code for k in all_error_classes() if issubclass(k, errors.InvalidRequest)} == {
        "invalid_request",
        "malformed_json",
        "unsupported_media_type",
        "not_acceptable",
        "prompt_missing",
        "prompt_too_large",
        "file_too_large",
        "context_length_exceeded",
        "unsupported_parameter",
        "unknown_worker",
        "unknown_model",
    }
    assert {k.code for k in all_error_classes() if issubclass(k, errors.WorkerError)} >= {"worker_timeout", "worker_protocol_error"}


def test_data_and_retry_after_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        errors.NotFound("message", {"data": 1})  # type: ignore[misc]


def test_custom_message_overrides_the_default_only_when_given() -> None:
    assert errors.PromptMissing("").message == errors.PromptMissing.default_message
    assert errors.PromptMissing("say something").message == "say something"


def test_errors_are_exceptions_that_can_chain() -> None:
    try:
        try:
            raise KeyError("x")
        except KeyError as inner:
            raise errors.WorkerProtocolError("bad body") from inner
    except errors.OrchestratorError as outer:
        assert isinstance(outer.__cause__, KeyError) and isinstance(outer, Exception)
