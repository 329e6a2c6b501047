"""A session's turns: read for the assemble stage, written once per request."""

from __future__ import annotations

import structlog
from django.db import DatabaseError, connection

from pipeline import selectors
from pipeline.models import SessionTurn
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


def session_turns_append(*, request: PromptRequest, reply: str, attempt: int = 1) -> bool:
    """The prompt and its reply, as the request's two turns of its session. False when
    Postgres could not store them: the answer stands, the session lacks the exchange
    (logged)."""
    params: dict[str, str | int] = {
        "tenant": request.tenant_id,
        "session": request.session_id,
        "request": request.request_id,
        "prompt": request.prompt,
        "reply": reply,
        "attempt": attempt,
    }
    try:
        with connection.cursor() as cursor:
            cursor.execute(_TURNS_SQL, params)
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
