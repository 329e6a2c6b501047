"""A session's turns: read for the assemble stage, written once per request, with
the request's row of the usage ledger in the same statement."""

from __future__ import annotations

from typing import Any

import structlog
from django.db import DatabaseError, connection

from pipeline import selectors
from pipeline.models import SessionTurn, UsageEntry
from pipeline.types import ChatMessage, PromptRequest

log = structlog.get_logger("pipeline.services")

# One INSERT for both turns, so both or neither, in one round trip. A request has one
# pair of turns (unique per request and role): a later attempt's reply replaces an
# earlier attempt's, an earlier one never replaces a later one. Only the attempt that
# settles the request can be the latest (fencing), so the stored reply is the one
# its clients read.
_TURNS_SQL = f"""
INSERT INTO {SessionTurn._meta.db_table} (tenant_id, session_id, request_id, role, content, attempt, created_at)
VALUES (%(tenant)s, %(session)s, %(request)s, 'user', %(prompt)s, %(attempt)s, now()),
       (%(tenant)s, %(session)s, %(request)s, 'assistant', %(reply)s, %(attempt)s, now())
ON CONFLICT (request_id, role) DO UPDATE SET content = EXCLUDED.content, attempt = EXCLUDED.attempt
WHERE {SessionTurn._meta.db_table}.attempt < EXCLUDED.attempt
"""


# The turns and the answer's ledger row (``services.budgets``) in one statement, one
# round trip; the row follows the same rule as the turns.
_TURNS_AND_USAGE_SQL = f"""
WITH turns AS ({_TURNS_SQL} RETURNING 1)
INSERT INTO {UsageEntry._meta.db_table}
  (tenant_id, api_key_id, session_id, request_id, worker, model, prompt_tokens, completion_tokens, cost_usd, outcome, attempt, created_at)
VALUES (%(tenant)s, %(api_key)s, %(session)s, %(request)s, %(worker)s, %(model)s, %(prompt_tokens)s, %(completion_tokens)s, %(cost_usd)s,
        %(outcome)s, %(attempt)s, now())
ON CONFLICT (request_id) DO UPDATE SET worker = EXCLUDED.worker, model = EXCLUDED.model, prompt_tokens = EXCLUDED.prompt_tokens,
  completion_tokens = EXCLUDED.completion_tokens, cost_usd = EXCLUDED.cost_usd, outcome = EXCLUDED.outcome, attempt = EXCLUDED.attempt
WHERE {UsageEntry._meta.db_table}.attempt < EXCLUDED.attempt
"""


def session_turns_append(*, request: PromptRequest, reply: str, attempt: int = 1, usage: dict[str, Any] | None = None) -> bool:
    """The prompt and its reply, as the request's two turns of its session, and with
    ``usage`` (the ledger row's ``worker``, ``model``, ``prompt_tokens``,
    ``completion_tokens``, ``cost_usd`` and ``outcome``) the request's row of the
    usage ledger. False when Postgres could not store them: the answer stands, the
    session lacks the exchange and the ledger the row (logged)."""
    params: dict[str, Any] = {
        "tenant": request.tenant_id,
        "session": request.session_id,
        "request": request.request_id,
        "prompt": request.prompt,
        "reply": reply,
        "attempt": attempt,
    }
    if usage is not None:
        params |= {"api_key": request.api_key_id, **usage}
    try:
        with connection.cursor() as cursor:
            cursor.execute(_TURNS_SQL if usage is None else _TURNS_AND_USAGE_SQL, params)
    except DatabaseError as exc:
        log.warning("session_turns_unsaved", request_id=request.request_id, session_id=request.session_id, outcome="error", error_type=type(exc).__name__)
        return False
    return True


def session_history_for(request: PromptRequest, *, turns: int) -> tuple[ChatMessage, ...]:
    """The session's stored turns. A request that named no session has a new one (its
    own request id, which no client could know before): nothing to read."""
    if not request.names_session:
        return ()
    return selectors.session_history(tenant_id=request.tenant_id, session_id=request.session_id, turns=turns)
