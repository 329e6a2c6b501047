"""Reads. Every selector takes the tenant: another tenant's row is simply not found."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid

import psycopg.errors
from django.db import OperationalError, connection, transaction

from orchestrator_site.errors import NotFound
from pipeline.models import Document, SessionTurn
from pipeline.stages.context import RetrievedDocument
from pipeline.stages.rag import RetrievalResult
from pipeline.types import ChatMessage

# OR semantics over the prompt's lexemes: a natural-language question rarely has
# every one of its words in the right document (plainto_tsquery would AND them).
# The search is bounded by its own statement timeout.
_SEARCH_SQL = """
SET LOCAL statement_timeout = %(timeout_ms)s;
SELECT d.id, d.title, d.body, ts_rank(d.search_vector, q.query) AS rank
FROM pipeline_document d,
     (SELECT replace(plainto_tsquery(%(cfg)s::regconfig, %(text)s)::text, ' & ', ' | ')::tsquery AS query) q
WHERE d.tenant_id = %(tenant)s AND d.search_vector @@ q.query
ORDER BY rank DESC, d.created_at DESC
LIMIT %(top_k)s
"""


# A session's latest turns, newest first (reversed once read): ``session_history``'s
# query, for ``document_search_ahead`` to send after the search. The search's
# timeout is lifted first: a cancelled statement is always the search.
_HISTORY_SQL = f"""
SET LOCAL statement_timeout = 0;
SELECT role, content FROM {SessionTurn._meta.db_table}
WHERE tenant_id = %(tenant)s AND session_id = %(session)s
ORDER BY id DESC
LIMIT %(messages)s
"""


def _search_params(*, tenant_id: str, query: str, top_k: int, timeout_ms: int, text_search_config: str) -> dict[str, str | int]:
    return {"cfg": text_search_config, "text": query, "tenant": tenant_id, "top_k": top_k, "timeout_ms": int(timeout_ms)}


# Whether the tenant has any document at all, which a search that found nothing does
# not say (``pipeline.presence``): the first entry of the tenant's index answers it.
_PRESENCE_SQL = f"SELECT EXISTS (SELECT 1 FROM {Document._meta.db_table} WHERE tenant_id = %(tenant)s)"


@dataclasses.dataclass(frozen=True)
class SearchAhead:
    """What ``document_search_ahead`` read: the search's result, the session's turns
    (None: not asked, or not read) and whether the tenant has any document (likewise)."""

    result: RetrievalResult
    history: tuple[ChatMessage, ...] | None = None
    has_documents: bool | None = None


def document_search(*, tenant_id: str, query: str, top_k: int, timeout_ms: int, text_search_config: str) -> RetrievalResult:
    params = _search_params(tenant_id=tenant_id, query=query, top_k=top_k, timeout_ms=timeout_ms, text_search_config=text_search_config)
    return _search(params, presence=False, history=False).result


def document_search_ahead(
    *, tenant_id: str, query: str, top_k: int, timeout_ms: int, text_search_config: str, session_id: str | None, turns: int, presence: bool
) -> SearchAhead:
    """``document_search`` and, in the same round trip, whether the tenant has any
    document (``presence``) and the latest ``turns`` exchanges of ``session_id`` (when
    one is given), as ``session_history`` reads them. A search that hit its timeout
    ends the statements after it too: neither is read."""
    params = _search_params(tenant_id=tenant_id, query=query, top_k=top_k, timeout_ms=timeout_ms, text_search_config=text_search_config)
    if session_id is not None:
        params |= {"session": session_id, "messages": 2 * max(turns, 0)}
    return _search(params, presence=presence, history=session_id is not None)


def _search(params: dict[str, str | int], *, presence: bool, history: bool) -> SearchAhead:
    """The search's result, then what else was asked (see ``SearchAhead``). A search
    cancelled by its timeout is an empty result that says so, and nothing after it was
    read."""
    sql = _SEARCH_SQL + (";" + _PRESENCE_SQL if presence else "") + (";" + _HISTORY_SQL if history else "")
    # Outside a transaction (a worker's case) the statements, sent as one string, are
    # one implicit transaction: SET LOCAL lasts for these statements only, in one round
    # trip (BEGIN, SET, SELECT and COMMIT were four). Inside one, a savepoint to roll
    # back to when the search is cancelled.
    within = transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext()
    has_documents: bool | None = None
    turns: tuple[ChatMessage, ...] | None = None
    try:
        with within, connection.cursor() as cursor:
            cursor.execute(sql, params)
            cursor.nextset()  # past SET's (empty) result, to the search's rows
            rows = cursor.fetchall()
            if presence:
                cursor.nextset()
                row = cursor.fetchone()
                has_documents = bool(row and row[0])
            if history:
                cursor.nextset()  # past the second SET's
                cursor.nextset()
                turns = tuple(ChatMessage(role, content) for role, content in reversed(cursor.fetchall()))
    except OperationalError as exc:
        if isinstance(exc.__cause__, psycopg.errors.QueryCanceled):
            return SearchAhead(RetrievalResult(documents=(), timed_out=True))
        raise
    documents = tuple(RetrievedDocument(id=str(r[0]), title=r[1], body=r[2], rank=float(r[3])) for r in rows)
    return SearchAhead(RetrievalResult(documents=documents), turns, has_documents)


def _uuid_or_404(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError as exc:
        raise NotFound("document not found") from exc


def document_get_for_tenant(*, tenant_id: str, document_id: str) -> Document:
    try:
        return Document.objects.get(tenant_id=tenant_id, id=_uuid_or_404(document_id))
    except Document.DoesNotExist as exc:
        raise NotFound("document not found") from exc


def document_list_for_tenant(*, tenant_id: str, limit: int, offset: int) -> list[Document]:
    return list(Document.objects.filter(tenant_id=tenant_id).order_by("-created_at")[offset : offset + limit])


def session_history(*, tenant_id: str, session_id: str, turns: int) -> tuple[ChatMessage, ...]:
    """The latest ``turns`` exchanges (two messages each), oldest first."""
    if turns <= 0:
        return ()
    recent = SessionTurn.objects.filter(tenant_id=tenant_id, session_id=session_id).order_by("-id").values_list("role", "content")[: 2 * turns]
    return tuple(ChatMessage(role, content) for role, content in reversed(list(recent)))
