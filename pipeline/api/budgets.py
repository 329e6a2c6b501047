"""A tenant's spend and budgets: ``GET /api/v1/budgets`` and ``GET /api/v1/usage``."""

from __future__ import annotations

import datetime as dt

from django.db.models import Q
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from orchestrator_site.errors import InvalidRequest
from pipeline.api import serializers as s
from pipeline.api.views import tenant_of
from pipeline.models import Budget
from pipeline.services import budgets

USAGE_DAYS_DEFAULT = 30
USAGE_DAYS_MAX = 366


class BudgetsApi(APIView):
    @extend_schema(responses={200: s.BudgetsOut, 401: s.ErrorOut}, operation_id="budgets")
    def get(self, request: Request) -> Response:
        """The budgets that apply to this key's requests: its tenant's, its own, and
        those of its tenant's sessions; each with what it has left in its period."""
        principal = tenant_of(request)
        mine = Q(scope="tenant") | Q(scope="session") | Q(scope="key", api_key_id=principal.api_key.id)
        items = Budget.objects.filter(mine, tenant_id=principal.tenant_id).select_related("api_key").order_by("scope", "id")
        return Response({"budgets": [standing.to_dict() for standing in budgets.standings(items)]})


def _day(request: Request, name: str, default: dt.date) -> dt.date:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        return dt.date.fromisoformat(raw)
    except ValueError as exc:
        raise InvalidRequest(f"{name} must be a date, YYYY-MM-DD", data={"field": name}) from exc


class UsageApi(APIView):
    @extend_schema(
        parameters=[
            OpenApiParameter("since", str, description="The first day (UTC, YYYY-MM-DD); default 30 days ago."),
            OpenApiParameter("until", str, description="The last day, included (UTC, YYYY-MM-DD); default today."),
        ],
        responses={200: s.UsageReportOut, 400: s.ErrorOut, 401: s.ErrorOut},
        operation_id="usage",
    )
    def get(self, request: Request) -> Response:
        """The tenant's spend from the usage ledger, by day, worker and model."""
        principal = tenant_of(request)
        today = dt.datetime.now(tz=dt.UTC).date()
        until = _day(request, "until", today)
        since = _day(request, "since", until - dt.timedelta(days=USAGE_DAYS_DEFAULT - 1))
        if since > until:
            raise InvalidRequest("since is after until", data={"field": "since"})
        if (until - since).days >= USAGE_DAYS_MAX:
            raise InvalidRequest(f"at most {USAGE_DAYS_MAX} days at once", data={"field": "since"})
        start = dt.datetime.combine(since, dt.time(), tzinfo=dt.UTC)
        end = dt.datetime.combine(until + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
        rows = budgets.usage_by_day(principal.tenant_id, since=start, until=end)
        return Response({"since": since.isoformat(), "until": until.isoformat(), "usage": rows})
