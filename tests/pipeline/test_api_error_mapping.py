"""The one exception handler maps DRF's and Django's exceptions into the tree."""

from __future__ import annotations

import pytest
from django.http import Http404
from rest_framework import exceptions as drf
from rest_framework.exceptions import ErrorDetail

from orchestrator_site import errors
from pipeline.api.errors import error_response, exception_handler, to_orchestrator_error, validation_error


@pytest.mark.parametrize(
    ("exc", "klass"),
    [
        (drf.ParseError("bad"), errors.MalformedJson),
        (drf.UnsupportedMediaType("text/plain"), errors.UnsupportedMediaType),
        (drf.NotAuthenticated(), errors.ApiKeyMissing),
        (drf.AuthenticationFailed(), errors.ApiKeyInvalid),
        (drf.MethodNotAllowed("PUT"), errors.MethodNotAllowed),
        (drf.NotFound(), errors.NotFound),
        (Http404(), errors.NotFound),
        (drf.PermissionDenied(), errors.NotFound),
        (drf.Throttled(3), errors.InvalidRequest),
    ],
)
def test_framework_exceptions_map_into_the_tree(exc: Exception, klass: type[errors.OrchestratorError]) -> None:
    assert type(to_orchestrator_error(exc)) is klass


def test_tree_errors_pass_through_and_others_are_left_to_django() -> None:
    original = errors.WorkerTimeout()
    assert to_orchestrator_error(original) is original
    assert to_orchestrator_error(ValueError("bug")) is None
    assert exception_handler(ValueError("bug"), {}) is None


def test_validation_error_picks_the_most_specific_code() -> None:
    assert isinstance(validation_error({"prompt": [ErrorDetail("x", code="required")]}), errors.PromptMissing)
    assert isinstance(validation_error({"prompt": [ErrorDetail("x", code="blank")]}), errors.PromptMissing)
    assert isinstance(validation_error({"prompt": [ErrorDetail("too big", code="too_large")]}), errors.PromptTooLarge)
    other = validation_error({"prompt": [ErrorDetail("x", code="invalid")], "stop": [ErrorDetail("y", code="invalid")]})
    assert type(other) is errors.InvalidRequest and other.data == {"fields": {"prompt": ["x"], "stop": ["y"]}}
    assert "prompt, stop" in other.message


def test_validation_error_on_non_objects_and_nested_fields() -> None:
    top = validation_error([ErrorDetail("Invalid data. Expected a dictionary", code="invalid")])
    assert type(top) is errors.InvalidRequest and top.data["fields"]["non_field_errors"]
    nested = validation_error({"metadata": {"k": [ErrorDetail("bad", code="invalid")]}})
    assert nested.data["fields"]["metadata"] == ["k: [ErrorDetail(string='bad', code='invalid')]"]
    scalar = validation_error({"x": ErrorDetail("plain", code="invalid")})
    assert scalar.data["fields"]["x"] == ["plain"]


def test_error_response_headers() -> None:
    limited = error_response(errors.WorkerRateLimited(retry_after=0.2))
    assert limited.status_code == 429 and limited["Retry-After"] == "1"  # never 0: clients would retry at once
    assert error_response(errors.WorkerRateLimited(retry_after=7.6))["Retry-After"] == "8"
    unauth = error_response(errors.ApiKeyInvalid())
    assert unauth.status_code == 401 and unauth["WWW-Authenticate"] == 'Bearer realm="api"'
    plain = error_response(errors.NotFound())
    assert "Retry-After" not in plain and "WWW-Authenticate" not in plain
    assert plain.data == {"error": {"code": "not_found", "message": "not found", "data": {}}}


def test_server_errors_are_logged() -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        exception_handler(errors.ServiceUnavailable(data={"service": "redis"}), {})
        exception_handler(errors.NotFound(), {})
    assert [(e["event"], e["code"]) for e in logs] == [("api_error", "service_unavailable")]
