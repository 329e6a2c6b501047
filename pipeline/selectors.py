"""Reads, from Postgres and from the request records on the token bus. Every
selector takes the tenant: another tenant's row is simply not found."""

from __future__ import annotations

import contextlib
import uuid

import psycopg.errors
from django.db import OperationalError, connection, transaction
from django.db.models import QuerySet

from orchestrator_site.errors import NotFound, OrchestratorError
from pipeline.models import Document, SessionTurn
from pipeline.stages.context import RetrievedDocument
from pipeline.stages.rag import RetrievalResult
from pipeline.tokenbus import RequestStatus, get_bus
from pipeline.types import ChatMessage, PipelineResult

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


def document_search(*, tenant_id: str, query: str, top_k: int, timeout_ms: int, text_search_config: str) -> RetrievalResult:
    """The tenant's documents that best match ``query``. A search cancelled by its
    timeout is an empty result that says so."""
    params: dict[str, str | int] = {"cfg": text_search_config, "text": query, "tenant": tenant_id, "top_k": top_k, "timeout_ms": int(timeout_ms)}
    # Outside a transaction (a worker's case) the two statements, sent as one string, are
    # one implicit transaction: SET LOCAL lasts for the search only, in one round trip
    # (BEGIN, SET, SELECT and COMMIT were four). Inside one, a savepoint to roll back to
    # when the search is cancelled.
    # A savepoint released keeps its SET LOCAL until the outer transaction ends: the
    # timeout is put back after the search, or every statement after it in that
    # transaction would be cut at the search's timeout.
    inside = connection.in_atomic_block
    within = transaction.atomic() if inside else contextlib.nullcontext()
    try:
        with within, connection.cursor() as cursor:
            cursor.execute(_SEARCH_SQL, params)
            cursor.nextset()  # past SET's (empty) result, to the search's rows
            rows = cursor.fetchall()
            if inside:
                cursor.execute("SET LOCAL statement_timeout TO DEFAULT")
    except OperationalError as exc:
        if isinstance(exc.__cause__, psycopg.errors.QueryCanceled):
            return RetrievalResult(documents=(), timed_out=True)
        raise
    return RetrievalResult(documents=tuple(RetrievedDocument(id=str(r[0]), title=r[1], body=r[2], rank=float(r[3])) for r in rows))


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


def documents_of_tenant(*, tenant_id: str) -> QuerySet[Document]:
    """The tenant's documents, newest first (a page of them is the caller's to take)."""
    return Document.objects.filter(tenant_id=tenant_id).order_by("-created_at", "-id")


def session_history(*, tenant_id: str, session_id: str, turns: int) -> tuple[ChatMessage, ...]:
    """The latest ``turns`` exchanges (two messages each), oldest first."""
    if turns <= 0:
        return ()
    recent = SessionTurn.objects.filter(tenant_id=tenant_id, session_id=session_id).order_by("-id").values_list("role", "content")[: 2 * turns]
    return tuple(ChatMessage(role, content) for role, content in reversed(list(recent)))


def request_status_for_tenant(*, tenant_id: str, request_id: str) -> dict[str, str]:
    """The record of one of the tenant's requests; another tenant's is not found."""
    record = get_bus().get_record(request_id)
    if not record or record.get("tenant_id") != tenant_id:
        raise NotFound("request not found", data={"request_id": request_id})
    return record


def request_result_for_tenant(*, tenant_id: str, request_id: str) -> tuple[str, PipelineResult | None]:
    """The status, with the result when completed (None while pending); the recorded
    error when it failed."""
    status = request_status_for_tenant(tenant_id=tenant_id, request_id=request_id).get("status", RequestStatus.QUEUED.value)
    if status not in (RequestStatus.COMPLETED, RequestStatus.FAILED):
        return status, None
    for event in reversed(get_bus().read_all(request_id)):
        if event.type == "done":
            return status, PipelineResult.from_dict(event.data)
        if event.type == "error":
            raise OrchestratorError.from_dict(event.data)
    raise NotFound("request not found", data={"request_id": request_id})  # the stream expired before the record
