"""``GET /api/v1/config``: the active config version, for operators (a staff session,
as for the admin; tenants' API keys do not reach it)."""

from __future__ import annotations

import os
from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework.authentication import SessionAuthentication
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from orchestrator_site.errors import AuthenticationFailed
from pipeline.config import config_version
from pipeline.config.versions import current_scope, settings_of, version_active


class ConfigApi(APIView):
    authentication_classes = [SessionAuthentication]
    permission_classes = [AllowAny]  # the staff check below answers in the error tree

    @extend_schema(operation_id="config_active", responses={200: dict[str, Any]})
    def get(self, request: Request) -> Response:
        if not getattr(request.user, "is_staff", False):
            raise AuthenticationFailed("a staff session is required: log in to the admin")
        active = version_active()
        body: dict[str, Any] = {"scope": current_scope(), "process": {"pid": os.getpid(), "version": config_version()}, "active": None}
        if active is not None:
            body["active"] = {
                "version": active.id,
                "applies": active.applies,
                "activated_at": active.activated_at.isoformat() if active.activated_at else None,
                "activated_by": active.activated_by,
                "source": active.source,
                "author": active.author,
                "comment": active.comment,
                "text": active.text,
                "settings": settings_of(active).model_dump(mode="json"),
            }
        return Response(body)
