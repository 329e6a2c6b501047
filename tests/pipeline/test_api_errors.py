"""Every bad input gets its own 4xx and code, in the one error format."""

from __future__ import annotations

import json

import pytest
from rest_framework.test import APIClient

from pipeline.auth import api_key_revoke
from tests.conftest import TenantFixture

INFER = "/api/v1/infer"


def error_of(resp: object) -> dict:
    body = resp.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "data"}
    return body["error"]


def raw_post(client: APIClient, body: str | bytes, content_type: str = "application/json") -> object:
    return client.generic("POST", INFER, body, content_type=content_type)


@pytest.mark.django_db
def test_malformed_json(owner: TenantFixture) -> None:
    resp = raw_post(owner.client, '{"prompt": "x",')
    assert resp.status_code == 400 and error_of(resp)["code"] == "malformed_json"


@pytest.mark.django_db
@pytest.mark.parametrize("body", ["NaN", '{"prompt": "x", "temperature": NaN}', '{"prompt": "x", "max_tokens": Infinity}'])
def test_non_standard_json_constants_are_malformed(owner: TenantFixture, body: str) -> None:
    resp = raw_post(owner.client, body)
    assert resp.status_code == 400 and error_of(resp)["code"] == "malformed_json"


@pytest.mark.django_db
@pytest.mark.parametrize("body", [{}, {"prompt": ""}, {"prompt": "   \n\t"}, {"prompt": None}, {"session_id": "s"}])
def test_missing_or_empty_prompt(owner: TenantFixture, body: dict) -> None:
    resp = owner.client.post(INFER, body, format="json")
    assert resp.status_code == 400 and error_of(resp)["code"] == "prompt_missing"


@pytest.mark.django_db
def test_prompt_over_the_limit(owner: TenantFixture, fakes: object) -> None:
    resp = owner.client.post(INFER, {"prompt": "x" * 2001}, format="json")  # the suite's limit is 2000
    error = error_of(resp)
    assert resp.status_code == 413 and error["code"] == "prompt_too_large" and "2000" in error["message"]


@pytest.mark.django_db
def test_body_over_the_limit_is_refused_before_parsing(owner: TenantFixture, fakes: object) -> None:
    resp = raw_post(owner.client, json.dumps({"prompt": "x", "metadata": {"pad": "y" * 200_000}}))
    assert resp.status_code == 413 and error_of(resp)["code"] == "prompt_too_large"


@pytest.mark.django_db
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_wrong_content_type(owner: TenantFixture, content_type: str) -> None:
    resp = raw_post(owner.client, "prompt=hello", content_type)
    assert resp.status_code == 415 and error_of(resp)["code"] == "unsupported_media_type"


@pytest.mark.django_db
def test_missing_key(anon: APIClient) -> None:
    resp = anon.post(INFER, {"prompt": "hi"}, format="json")
    assert resp.status_code == 401 and error_of(resp)["code"] == "api_key_missing"
    assert resp["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.django_db
@pytest.mark.parametrize("header", ["Bearer po_nope_nope", "Bearer sk-openai-style", "Basic dXNlcjpwYXNz", "Bearer"])
def test_bad_key(anon: APIClient, header: str) -> None:
    anon.credentials(HTTP_AUTHORIZATION=header)
    resp = anon.post(INFER, {"prompt": "hi"}, format="json")
    assert resp.status_code == 401 and error_of(resp)["code"] == "api_key_invalid"


@pytest.mark.django_db
def test_revoked_key(owner: TenantFixture) -> None:
    api_key_revoke(api_key=owner.issued.api_key)
    resp = owner.client.post(INFER, {"prompt": "hi"}, format="json")
    assert resp.status_code == 401 and error_of(resp)["code"] == "api_key_revoked"


@pytest.mark.django_db
def test_unknown_worker(owner: TenantFixture, fakes: object) -> None:
    resp = owner.client.post(INFER, {"prompt": "hi", "worker": "gpt-17"}, format="json")
    error = error_of(resp)
    assert resp.status_code == 400 and error["code"] == "unknown_worker"
    assert "echo" in error["data"]["available"]


@pytest.mark.django_db
def test_unknown_model(owner: TenantFixture, fakes: object) -> None:
    resp = owner.client.post(INFER, {"prompt": "hi", "worker": "openai", "model": "gpt-9"}, format="json")
    error = error_of(resp)
    assert resp.status_code == 400 and error["code"] == "unknown_model"
    assert error["data"] == {"worker": "openai", "model": "gpt-9", "available": ["gpt-fake", "gpt-other"]}


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "hi", "temperature": 5}, "temperature"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "hi", "stop": "END"}, "stop"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "hi", "session_id": "has spaces"}, "session_id"),
        ({"prompt": "hi", "metadata": [1]}, "metadata"),
        ({"prompt": "hi", "metadata": {"k": "v" * 5000}}, "metadata"),
        ({"prompt": "hi", "wait": "sometimes"}, "wait"),
        ({"prompt": ["a", "list"]}, "prompt"),
        ({"prompt": "nul \u0000 inside"}, "prompt"),
        ({"prompt": "hi", "worker": "nul\u0000"}, "worker"),
    ],
)
def test_invalid_fields_name_the_field(owner: TenantFixture, fakes: object, body: dict, field: str) -> None:
    resp = owner.client.post(INFER, body, format="json")
    error = error_of(resp)
    assert resp.status_code == 400 and error["code"] == "invalid_request"
    assert list(error["data"]["fields"]) == [field]


@pytest.mark.django_db
def test_lone_surrogate_is_rejected(owner: TenantFixture) -> None:
    resp = raw_post(owner.client, '{"prompt": "bad \\ud800 text"}')
    assert resp.status_code == 400 and list(error_of(resp)["data"]["fields"]) == ["prompt"]


@pytest.mark.django_db
@pytest.mark.parametrize("body", ["[]", '"just a string"', "42", "null"])
def test_body_must_be_an_object(owner: TenantFixture, body: str) -> None:
    resp = raw_post(owner.client, body)
    assert resp.status_code == 400 and error_of(resp)["code"] in ("invalid_request", "prompt_missing")


@pytest.mark.django_db
def test_max_tokens_over_the_limit(owner: TenantFixture, fakes: object) -> None:
    resp = owner.client.post(INFER, {"prompt": "hi", "max_tokens": 5000}, format="json")
    assert resp.status_code == 400 and error_of(resp)["data"] == {"fields": {"max_tokens": ["may be at most 4096 (limits.max_tokens_limit)"]}}


@pytest.mark.django_db
@pytest.mark.parametrize(("value", "problem"), [(0, "Ensure this value is greater than or equal to 1."), ("8", "A valid integer is required.")])
def test_max_tokens_below_one_or_not_an_integer(owner: TenantFixture, value: object, problem: str) -> None:
    resp = owner.client.post(INFER, {"prompt": "hi", "max_tokens": value}, format="json")
    assert resp.status_code == 400 and error_of(resp)["data"] == {"fields": {"max_tokens": [problem]}}


@pytest.mark.django_db(transaction=True)
def test_max_tokens_null_is_the_default(owner: TenantFixture, realtime_worker: object) -> None:
    """Once a 500: pydantic applied the lower bound to null (found by the fuzz test)."""
    resp = owner.client.post(INFER, {"prompt": "hi", "max_tokens": None, "session_id": None}, format="json")
    assert resp.status_code == 200, resp.content
    for path in ("/v1/chat/completions",):
        body = {"model": "echo/echo-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": None}
        assert owner.client.post(path, body, format="json").status_code == 200


@pytest.mark.django_db
def test_method_not_allowed(owner: TenantFixture) -> None:
    resp = owner.client.get(INFER)
    assert resp.status_code == 405 and error_of(resp)["code"] == "method_not_allowed"


@pytest.mark.django_db
def test_outsider_gets_404_on_unknown_request(owner: TenantFixture) -> None:
    for path in ("/api/v1/status/nope", "/api/v1/result/nope"):
        resp = owner.client.get(path)
        assert resp.status_code == 404 and error_of(resp)["code"] == "not_found"


@pytest.mark.django_db
@pytest.mark.parametrize("path", [INFER, "/v1/chat/completions"])
def test_an_accept_header_nothing_here_satisfies_is_406(owner: TenantFixture, path: str) -> None:
    body = {"prompt": "x"} if path == INFER else {"model": "echo", "messages": [{"role": "user", "content": "x"}]}
    resp = owner.client.post(path, body, format="json", HTTP_ACCEPT="text/html")
    assert resp.status_code == 406 and resp.json()["error"]["code"] == "not_acceptable"


@pytest.mark.django_db
@pytest.mark.parametrize("path", [INFER, "/v1/chat/completions"])
def test_a_whole_answer_asked_for_as_an_event_stream_is_406(owner: TenantFixture, path: str) -> None:
    body = {"prompt": "x", "stream": False} if path == INFER else {"model": "echo", "messages": [{"role": "user", "content": "x"}]}
    resp = owner.client.post(path, body, format="json", HTTP_ACCEPT="text/event-stream")
    assert resp.status_code == 406 and resp["Content-Type"].startswith("text/event-stream")
    assert b'"code":"not_acceptable"' in resp.content
    # The platform frames it as its error event; the OpenAI API as OpenAI frames a failed stream.
    assert resp.content.startswith(b"event: error\n" if path == INFER else b'data: {"error":{"message":')
