"""The public error contract: each code with its HTTP status and WebSocket close code.

Clients match on these; changing one is a breaking change and must change this table."""

from __future__ import annotations

import pytest

from orchestrator_site import errors
from orchestrator_site.errors import all_error_classes

CONTRACT = {
    "internal_error": (500, 4500),
    "config_invalid": (500, 4500),
    "config_needs_restart": (409, 4409),
    "stage_order": (500, 4500),
    "invalid_request": (400, 4400),
    "malformed_json": (400, 4400),
    "unsupported_media_type": (415, 4415),
    "not_acceptable": (406, 4406),
    "prompt_missing": (400, 4400),
    "prompt_too_large": (413, 4413),
    "file_too_large": (413, 4413),
    "context_length_exceeded": (400, 4400),
    "unsupported_parameter": (400, 4400),
    "unknown_worker": (400, 4400),
    "unknown_model": (400, 4400),
    "authentication_failed": (401, 4401),
    "api_key_missing": (401, 4401),
    "api_key_invalid": (401, 4401),
    "api_key_revoked": (401, 4401),
    "not_found": (404, 4404),
    "method_not_allowed": (405, 4405),
    "request_timeout": (504, 4504),
    "request_cancelled": (499, 4499),
    "service_unavailable": (503, 4503),
    "worker_lost": (503, 4503),
    "overloaded": (503, 4503),
    "rate_limited": (429, 4429),
    "budget_exceeded": (402, 4402),
    "batch_expired": (410, 4410),
    "delivery_failed": (502, 4502),
    "circuit_open": (503, 4503),
    "worker_error": (502, 4502),
    "worker_unavailable": (503, 4503),
    "worker_rate_limited": (429, 4429),
    "worker_timeout": (504, 4504),
    "worker_connection_error": (502, 4502),
    "worker_rejected": (502, 4502),
    "worker_auth_error": (502, 4502),
    "worker_protocol_error": (502, 4502),
}


def test_the_table_covers_exactly_the_tree() -> None:
    assert {k.code for k in all_error_classes()} == set(CONTRACT)


@pytest.mark.parametrize("klass", all_error_classes(), ids=lambda k: k.code)
def test_each_code_keeps_its_statuses(klass: type[errors.OrchestratorError]) -> None:
    assert (klass.http_status, klass.ws_close_code) == CONTRACT[klass.code]


def test_retryable_errors_are_exactly_the_transient_ones() -> None:
    retryable = {k.code for k in all_error_classes() if k.retryable}
    assert retryable == {
        "service_unavailable",
        "worker_lost",
        "circuit_open",
        "overloaded",
        "rate_limited",
        "worker_unavailable",
        "worker_rate_limited",
        "worker_timeout",
        "worker_connection_error",
    }


def test_every_default_message_is_a_sentence_fragment_without_secrets() -> None:
    for klass in all_error_classes():
        message = klass.default_message
        assert message and message == message.strip() and not message.endswith(".")
        assert "{" not in message and "Traceback" not in message


def test_data_is_copied_not_shared() -> None:
    data = {"k": 1}
    error = errors.InvalidRequest(data=data)
    data["k"] = 2
    assert error.data == {"k": 1}
    wire = error.to_dict()
    wire["data"]["k"] = 3
    assert error.data == {"k": 1}


def test_str_is_the_message() -> None:
    assert str(errors.UnknownWorker("no worker named 'x'")) == "no worker named 'x'"
    assert str(errors.NotFound()) == "not found"
