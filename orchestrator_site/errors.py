"""The one error tree of prompt-orchestrator.

Every error the system raises across an API, task or consumer boundary is an
``OrchestratorError``. Each class has a stable ``code`` (part of the public
API: clients match on it), an HTTP status and a WebSocket close code. Outside
exceptions (httpx, redis, psycopg, kombu) are translated at one choke point
per integration with ``raise ... from exc``.

    OrchestratorError ............................ 500 internal_error
    ├── ConfigInvalid ............................ 500 config_invalid
    ├── ConfigNeedsRestart ....................... 409 config_needs_restart (a config version that cannot apply live)
    ├── StageOrderError .......................... 500 stage_order (a bug: stages ran out of order)
    ├── InvalidRequest ........................... 400 invalid_request
    │   ├── MalformedJson ........................ 400 malformed_json
    │   ├── UnsupportedMediaType ................. 415 unsupported_media_type
    │   ├── NotAcceptable ........................ 406 not_acceptable (no answer in a type the Accept header allows)
    │   ├── PromptMissing ........................ 400 prompt_missing
    │   ├── PromptTooLarge ....................... 413 prompt_too_large
    │   ├── FileTooLarge ......................... 413 file_too_large (an upload to /v1/files over batch.max_body_mb)
    │   ├── ContextLengthExceeded ................ 400 context_length_exceeded (longer than the model's window)
    │   ├── UnsupportedParameter ................. 400 unsupported_parameter (a field the worker cannot honour)
    │   ├── UnknownWorker ........................ 400 unknown_worker
    │   └── UnknownModel ......................... 400 unknown_model
    ├── AuthenticationFailed ..................... 401 authentication_failed
    │   ├── ApiKeyMissing ........................ 401 api_key_missing
    │   ├── ApiKeyInvalid ........................ 401 api_key_invalid
    │   └── ApiKeyRevoked ........................ 401 api_key_revoked
    ├── NotFound ................................. 404 not_found
    ├── MethodNotAllowed ......................... 405 method_not_allowed
    ├── RequestTimeout ........................... 504 request_timeout
    ├── RequestCancelled ......................... 499 request_cancelled (every reader of the stream left)
    ├── ServiceUnavailable ....................... 503 service_unavailable (retry_after)
    ├── WorkerLost ............................... 503 worker_lost (the run died after its first tokens)
    ├── Overloaded ............................... 503 overloaded (queue full: shed, retry_after)
    ├── RateLimited .............................. 429 rate_limited (tenant over its RPM/TPM, retry_after)
    ├── BudgetExceeded ........................... 402 budget_exceeded (a budget that applies cannot cover the request)
    ├── BatchExpired ............................. 410 batch_expired (a batch item not run by its job's deadline)
    ├── DeliveryFailed ........................... 502 delivery_failed (a batch job's destination could not take its results)
    ├── CircuitOpen .............................. 503 circuit_open (worker's breaker open, no fallback)
    └── WorkerError .............................. 502 worker_error
        ├── TransientWorkerError ................. 503 worker_unavailable   (retryable)
        │   ├── WorkerRateLimited ................ 429 worker_rate_limited  (retry_after)
        │   ├── WorkerTimeout .................... 504 worker_timeout
        │   └── WorkerConnectionError ............ 502 worker_connection_error
        └── PermanentWorkerError ................. 502 worker_rejected
            ├── WorkerAuthError .................. 502 worker_auth_error
            └── WorkerProtocolError .............. 502 worker_protocol_error

This module imports nothing from the project or from Django: ``workers`` uses
it too.
"""

from __future__ import annotations

from typing import Any, ClassVar


class OrchestratorError(Exception):
    """Root of the tree. Carries a message, structured ``data`` and ``retry_after``."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    ws_close_code: ClassVar[int] = 4500
    default_message: ClassVar[str] = "internal error"
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str | None = None,
        *,
        data: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.data: dict[str, Any] = dict(data or {})
        self.retry_after = retry_after
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        """The wire form: ``{"code", "message", "data"}`` (``retry_after`` inside data)."""
        data = dict(self.data)
        if self.retry_after is not None:
            data["retry_after"] = self.retry_after
        return {"code": self.code, "message": self.message, "data": data}

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> OrchestratorError:
        """Rebuild an error that crossed a process boundary (task -> token stream -> gateway)."""
        code = str(payload.get("code", OrchestratorError.code))
        klass = error_class_for_code(code)
        data = dict(payload.get("data") or {})
        retry_after = data.pop("retry_after", None)
        return klass(
            str(payload.get("message") or klass.default_message),
            data=data,
            retry_after=float(retry_after) if isinstance(retry_after, int | float) else None,
        )


class ConfigInvalid(OrchestratorError):
    code = "config_invalid"
    default_message = "configuration is invalid"


class ConfigNeedsRestart(OrchestratorError):
    """A config version whose changes running processes cannot take (``data["changes"]``)."""

    code = "config_needs_restart"
    http_status = 409
    ws_close_code = 4409
    default_message = "this config version needs a restart of every process"


class StageOrderError(OrchestratorError):
    code = "stage_order"
    default_message = "pipeline stages ran out of order"


class InvalidRequest(OrchestratorError):
    code = "invalid_request"
    http_status = 400
    ws_close_code = 4400
    default_message = "the request is invalid"


class MalformedJson(InvalidRequest):
    code = "malformed_json"
    default_message = "the request body is not valid JSON"


class UnsupportedMediaType(InvalidRequest):
    code = "unsupported_media_type"
    http_status = 415
    ws_close_code = 4415
    default_message = "the request body must be application/json"


class NotAcceptable(InvalidRequest):
    code = "not_acceptable"
    http_status = 406
    ws_close_code = 4406
    default_message = "no answer in a media type the Accept header allows"


class PromptMissing(InvalidRequest):
    code = "prompt_missing"
    default_message = "prompt is required and must not be empty"


class PromptTooLarge(InvalidRequest):
    code = "prompt_too_large"
    http_status = 413
    ws_close_code = 4413
    default_message = "prompt is larger than the configured limit"


class ContextLengthExceeded(InvalidRequest):
    """The provider refused the request as longer than the model's context window: the
    client's to shorten (``data``: the window and what the provider counted)."""

    code = "context_length_exceeded"
    default_message = "the request is longer than the model's context window"


class UnsupportedParameter(InvalidRequest):
    """A request field the chosen worker's provider cannot honour (``data``: the field,
    the worker): refused rather than dropped without a word."""

    code = "unsupported_parameter"
    default_message = "the worker cannot honour this field"


class UnknownWorker(InvalidRequest):
    code = "unknown_worker"
    default_message = "no such worker"


class FileTooLarge(InvalidRequest):
    """An upload to ``/v1/files`` over ``batch.max_body_mb``."""

    code = "file_too_large"
    http_status = 413
    ws_close_code = 4413
    default_message = "the file is too large"


class UnknownModel(InvalidRequest):
    code = "unknown_model"
    default_message = "the worker does not serve this model"


class AuthenticationFailed(OrchestratorError):
    code = "authentication_failed"
    http_status = 401
    ws_close_code = 4401
    default_message = "authentication failed"


class ApiKeyMissing(AuthenticationFailed):
    code = "api_key_missing"
    default_message = "send the API key as 'Authorization: Bearer <key>'"


class ApiKeyInvalid(AuthenticationFailed):
    code = "api_key_invalid"
    default_message = "the API key is not valid"


class ApiKeyRevoked(AuthenticationFailed):
    code = "api_key_revoked"
    default_message = "the API key has been revoked"


class NotFound(OrchestratorError):
    code = "not_found"
    http_status = 404
    ws_close_code = 4404
    default_message = "not found"


class MethodNotAllowed(OrchestratorError):
    code = "method_not_allowed"
    http_status = 405
    ws_close_code = 4405
    default_message = "method not allowed"


class RequestTimeout(OrchestratorError):
    code = "request_timeout"
    http_status = 504
    ws_close_code = 4504
    default_message = "the request did not finish in time"


class RequestCancelled(OrchestratorError):
    """Every client reading the request's stream went away, so its upstream call
    was stopped. Only a client that resumes afterwards ever sees it."""

    code = "request_cancelled"
    http_status = 499  # nginx's "client closed request"
    ws_close_code = 4499
    default_message = "every client of this request went away; it was stopped"


class ServiceUnavailable(OrchestratorError):
    code = "service_unavailable"
    http_status = 503
    ws_close_code = 4503
    default_message = "a backing service is unavailable"
    retryable = True


class WorkerLost(OrchestratorError):
    """The run answering a request stopped (its worker process died, say) after its
    first tokens had reached the client: a new run would repeat them. Retry the request."""

    code = "worker_lost"
    http_status = 503
    ws_close_code = 4503
    default_message = "the worker running this request was lost; retry it"
    retryable = True


class Overloaded(OrchestratorError):
    code = "overloaded"
    http_status = 503
    ws_close_code = 4503
    default_message = "too many requests in flight; retry later"
    retryable = True


class RateLimited(OrchestratorError):
    code = "rate_limited"
    http_status = 429
    ws_close_code = 4429
    default_message = "the tenant's rate limit is reached"
    retryable = True


class BudgetExceeded(OrchestratorError):
    """A budget that applies to the request (its key's, its session's or its tenant's)
    cannot cover what it may cost; ``data`` names the budget, what remains and when it
    resets."""

    code = "budget_exceeded"
    http_status = 402
    ws_close_code = 4402
    default_message = "a budget that applies to this request is used up"


class BatchExpired(OrchestratorError):
    """A batch item its job's ``deadline`` passed before it ran: it was not run, and
    will not be (``data``: the deadline)."""

    code = "batch_expired"
    http_status = 410
    ws_close_code = 4410
    default_message = "the batch job's deadline passed before this item ran"


class DeliveryFailed(OrchestratorError):
    """A batch job's results could not be delivered to one of its destinations (a
    delivery's state, never a response: the job and its results are unaffected)."""

    code = "delivery_failed"
    http_status = 502
    ws_close_code = 4502
    default_message = "the results could not be delivered"


class CircuitOpen(OrchestratorError):
    code = "circuit_open"
    http_status = 503
    ws_close_code = 4503
    default_message = "the worker is failing and its circuit is open; retry later"
    retryable = True


class WorkerError(OrchestratorError):
    code = "worker_error"
    http_status = 502
    ws_close_code = 4502
    default_message = "the model worker failed"


class TransientWorkerError(WorkerError):
    code = "worker_unavailable"
    http_status = 503
    ws_close_code = 4503
    default_message = "the model worker is temporarily unavailable"
    retryable = True


class WorkerRateLimited(TransientWorkerError):
    code = "worker_rate_limited"
    http_status = 429
    ws_close_code = 4429
    default_message = "the model provider is rate limiting"


class WorkerTimeout(TransientWorkerError):
    code = "worker_timeout"
    http_status = 504
    ws_close_code = 4504
    default_message = "the model worker timed out"


class WorkerConnectionError(TransientWorkerError):
    code = "worker_connection_error"
    http_status = 502
    ws_close_code = 4502
    default_message = "the connection to the model worker failed"


class PermanentWorkerError(WorkerError):
    code = "worker_rejected"
    default_message = "the model worker rejected the request"


class WorkerAuthError(PermanentWorkerError):
    code = "worker_auth_error"
    default_message = "the model provider rejected the credentials"


class WorkerProtocolError(PermanentWorkerError):
    code = "worker_protocol_error"
    default_message = "the model worker sent a malformed response"


def all_error_classes() -> list[type[OrchestratorError]]:
    """Every class of the tree, root first (used by the registry and the meta-test)."""
    found: list[type[OrchestratorError]] = [OrchestratorError]
    pending = [OrchestratorError]
    while pending:
        for sub in pending.pop().__subclasses__():
            found.append(sub)
            pending.append(sub)
    return found


def error_class_for_code(code: str) -> type[OrchestratorError]:
    for klass in all_error_classes():
        if klass.code == code:
            return klass
    return OrchestratorError
