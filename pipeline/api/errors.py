"""The one exception handler. Every API error is ``{"error": {"code", "message", "data"}}``,
except under ``/v1/`` (the OpenAI-compatible API), where it is OpenAI's body,
``{"error": {"message", "type", "param", "code"}}``, so that the OpenAI SDKs raise their
usual exception classes and read the fields they know."""

from __future__ import annotations

from typing import Any

import structlog
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions as drf
from rest_framework.response import Response

from orchestrator_site.errors import (
    ApiKeyInvalid,
    ApiKeyMissing,
    InvalidRequest,
    MalformedJson,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    OrchestratorError,
    PromptMissing,
    PromptTooLarge,
    UnsupportedMediaType,
)

log = structlog.get_logger("pipeline.api")

_PROMPT_MISSING_CODES = {"required", "blank", "null"}


def validation_error(detail: Any) -> OrchestratorError:
    """The most specific error for a serializer's field errors."""
    if not isinstance(detail, dict):
        return InvalidRequest("the request body must be a JSON object", data={"fields": {"non_field_errors": _messages(detail)}})
    prompt_errors = detail.get("prompt")
    if isinstance(prompt_errors, list) and prompt_errors:
        code = getattr(prompt_errors[0], "code", "")
        if code in _PROMPT_MISSING_CODES:
            return PromptMissing()
        if code == "too_large":
            return PromptTooLarge(str(prompt_errors[0]))
    fields = {str(name): _messages(errors) for name, errors in detail.items()}
    return InvalidRequest("some fields are invalid: " + ", ".join(sorted(fields)), data={"fields": fields})


def _messages(errors: Any) -> list[str]:
    if isinstance(errors, list):
        return [str(e) for e in errors]
    if isinstance(errors, dict):
        return [f"{k}: {v}" for k, v in errors.items()]
    return [str(errors)]


def to_orchestrator_error(exc: Exception) -> OrchestratorError | None:
    if isinstance(exc, OrchestratorError):
        return exc
    if isinstance(exc, drf.ParseError):
        return MalformedJson(f"the request body is not valid JSON: {exc.detail}")
    if isinstance(exc, drf.UnsupportedMediaType):
        return UnsupportedMediaType()
    if isinstance(exc, drf.NotAuthenticated):
        return ApiKeyMissing()
    if isinstance(exc, drf.AuthenticationFailed):
        return ApiKeyInvalid()
    if isinstance(exc, drf.NotAcceptable):
        return NotAcceptable(f"no answer in a media type the Accept header allows: {exc.detail}")
    if isinstance(exc, drf.MethodNotAllowed):
        return MethodNotAllowed(str(exc.detail))
    if isinstance(exc, drf.NotFound | Http404 | drf.PermissionDenied):
        return NotFound()  # never 403: another tenant's objects simply do not exist
    if isinstance(exc, drf.ValidationError):
        return validation_error(exc.detail)
    if isinstance(exc, drf.APIException):
        return InvalidRequest(str(exc.detail), data={"status": exc.status_code})
    return None


OPENAI_PREFIX = "/v1/"
# OpenAI's error types, by HTTP status (the rest of 4xx: invalid_request_error; 5xx: server_error).
_OPENAI_TYPES = {401: "authentication_error", 402: "insufficient_quota", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
# Where OpenAI has its own code for the same error, clients match on that one.
_OPENAI_CODES = {
    "api_key_invalid": "invalid_api_key",
    "api_key_revoked": "invalid_api_key",
    "rate_limited": "rate_limit_exceeded",
    "budget_exceeded": "insufficient_quota",
    "unknown_model": "model_not_found",
}


def openai_body(error: OrchestratorError) -> dict[str, Any]:
    """``error`` in OpenAI's shape: its type from the status, the field at fault as ``param``."""
    kind = _OPENAI_TYPES.get(error.http_status) or ("server_error" if error.http_status >= 500 else "invalid_request_error")
    fields = error.data.get("fields")
    param = error.data.get("field") or (next(iter(fields)) if isinstance(fields, dict) and fields else None)
    if param is None and error.code in ("unknown_model", "unknown_worker"):
        param = "model"
    message = error.message
    if isinstance(fields, dict) and fields:  # OpenAI's body has no room for the field list: the message says it all
        message = "; ".join(f"{name}: {', '.join(map(str, problems)) if isinstance(problems, list) else problems}" for name, problems in fields.items())
    return {"error": {"message": message, "type": kind, "param": param, "code": _OPENAI_CODES.get(error.code, error.code)}}


def is_openai_path(request: Any) -> bool:
    return str(getattr(request, "path", "")).startswith(OPENAI_PREFIX)


def error_response(error: OrchestratorError, *, openai: bool = False) -> Response:
    headers: dict[str, str] = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    if error.http_status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="api"'
    body = openai_body(error) if openai else {"error": error.to_dict()}
    return Response(body, status=error.http_status, headers=headers)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    error = to_orchestrator_error(exc)
    if error is None:
        return None  # a bug: Django logs it and handler500 renders internal_error
    if error.http_status >= 500:
        log.warning("api_error", code=error.code, status=error.http_status, outcome="error")
    return error_response(error, openai=is_openai_path(context.get("request")))


def _json_error(request: HttpRequest, error: OrchestratorError) -> JsonResponse:
    return JsonResponse(openai_body(error) if is_openai_path(request) else {"error": error.to_dict()}, status=error.http_status)


def not_found_view(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return _json_error(request, NotFound("no such endpoint"))


def server_error_view(request: HttpRequest) -> JsonResponse:
    return _json_error(request, OrchestratorError())
