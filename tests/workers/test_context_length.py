"""A request longer than the model's context window is the client's error, 400
``context_length_exceeded`` with the window and what the provider counted, in every
provider's phrasing; any other refusal stays what it was."""

from __future__ import annotations

import json

import pytest

from orchestrator_site.errors import ContextLengthExceeded, PermanentWorkerError
from workers.http import context_length_error, error_for_status

LLAMA = {
    "error": {
        "code": 400,
        "message": "request (401 tokens) exceeds the available context size (256 tokens), try increasing it",
        "type": "exceed_context_size_error",
        "n_prompt_tokens": 401,
        "n_ctx": 256,
    }
}  # the real llama-server's answer, captured with -c 256
OPENAI = {
    "error": {
        "message": "This model's maximum context length is 8192 tokens. However, your messages resulted in 9001 tokens. Please reduce the length of the messages.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}
VLLM = {
    "object": "error",
    "message": "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (4000 in the messages, 1000 in the completion). Please reduce the length of the messages or completion.",
    "type": "BadRequestError",
    "param": None,
    "code": 400,
}
ANTHROPIC = {"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long: 208310 tokens > 200000 maximum"}}
OPENAI_TERSE = {
    "error": {
        "message": "Your input exceeds the context window of this model.",
        "type": "invalid_request_error",
        "param": "input",
        "code": "context_length_exceeded",
    }
}


@pytest.mark.parametrize(
    ("body", "window", "requested"),
    [(LLAMA, 256, 401), (OPENAI, 8192, 9001), (VLLM, 4096, 5000), (ANTHROPIC, 200000, 208310), (OPENAI_TERSE, None, None)],
    ids=["llamacpp", "openai", "vllm", "anthropic", "openai-terse"],
)
def test_each_providers_words_become_context_length_exceeded(body: dict, window: int | None, requested: int | None) -> None:
    error = error_for_status("w", 400, {}, json.dumps(body).encode())
    assert isinstance(error, ContextLengthExceeded)
    assert (error.code, error.http_status, error.retryable) == ("context_length_exceeded", 400, False)
    assert (error.data["context_tokens"], error.data["requested_tokens"], error.data["worker"]) == (window, requested, "w")
    assert error.data["upstream_message"] and error.message == "w: the request is longer than the model's context window"


@pytest.mark.parametrize(
    "body",
    [
        {"error": {"message": "max_tokens: Field required", "type": "invalid_request_error"}},
        {"type": "error", "error": {"type": "invalid_request_error", "message": "messages: roles must alternate"}},
        b"<html>bad request</html>",
        b"not json at all",
    ],
)
def test_other_refusals_stay_what_they_were(body: object) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert context_length_error("w", 400, raw) is None
    assert isinstance(error_for_status("w", 400, {}, raw), PermanentWorkerError)


def test_only_a_client_error_status_can_be_a_context_error() -> None:
    raw = json.dumps(OPENAI).encode()
    assert context_length_error("w", 500, raw) is None and context_length_error("w", 413, raw) is not None
