"""The one envelope of every list endpoint: ``{count, next, previous, results}``, by
DRF's limit/offset pagination (``?limit=`` at most 500, default 50; ``?offset=``).
A limit or offset that is not an integer is a 400, not silently the default."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from django.db.models import QuerySet
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.request import Request
from rest_framework.response import Response

from orchestrator_site.errors import InvalidRequest


class Page(LimitOffsetPagination):
    default_limit = 50
    max_limit = 500


def paginated(request: Request, queryset: QuerySet[Any], render: Callable[[Any], dict[str, Any]]) -> Response:
    """One page of ``queryset`` (already in its order), each row ``render``-ed."""
    for name in ("limit", "offset"):
        raw = request.query_params.get(name)
        if raw is not None and not (raw.isdigit() and (name == "offset" or int(raw) > 0)):
            raise InvalidRequest(f"{name} must be a {'positive' if name == 'limit' else 'non-negative'} integer", data={"field": name})
    paginator = Page()
    rows: Iterable[Any] = paginator.paginate_queryset(queryset, request) or []
    return paginator.get_paginated_response([render(row) for row in rows])
