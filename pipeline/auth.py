"""Tenant API keys: generation, hashing, and DRF authentication by ``Authorization: Bearer``."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.utils import timezone
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from orchestrator_site.errors import ApiKeyInvalid, ApiKeyMissing, ApiKeyRevoked
from pipeline.models import ApiKey, Tenant

KEY_PREFIX = "po_"


def hash_key(raw: str) -> str:
    # Keys are 256-bit random strings, so a fast unsalted hash is enough: there is
    # nothing to brute-force, and lookup must stay one indexed query per request.
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    raw: str  # shown once, never stored


def api_key_issue(*, tenant: Tenant, name: str = "") -> IssuedKey:
    public = secrets.token_hex(4)
    raw = f"{KEY_PREFIX}{public}_{secrets.token_urlsafe(32)}"
    key = ApiKey.objects.create(tenant=tenant, name=name, prefix=f"{KEY_PREFIX}{public}", key_hash=hash_key(raw))
    return IssuedKey(api_key=key, raw=raw)


@transaction.atomic
def tenant_create(*, name: str, key_name: str = "default") -> IssuedKey:
    tenant = Tenant.objects.create(name=name)
    return api_key_issue(tenant=tenant, name=key_name)


def api_key_revoke(*, api_key: ApiKey) -> None:
    ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())


def api_key_authenticate(raw: str) -> ApiKey:
    """The key's row (with its tenant), or the error that says why not."""
    if not raw.startswith(KEY_PREFIX):
        raise ApiKeyInvalid()
    try:
        key = ApiKey.objects.select_related("tenant").get(key_hash=hash_key(raw))
    except ApiKey.DoesNotExist as exc:
        raise ApiKeyInvalid() from exc
    if key.is_revoked or not key.tenant.is_active:
        raise ApiKeyRevoked()
    return key


def bearer_token(header: bytes | str) -> str | None:
    raw = header.decode("latin-1") if isinstance(header, bytes) else header
    scheme, _, token = raw.strip().partition(" ")
    if not scheme:
        return None
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiKeyInvalid("use 'Authorization: Bearer <key>'")
    return token.strip()


@dataclass(frozen=True)
class TenantPrincipal:
    """``request.user`` for API calls: the tenant behind the key."""

    tenant: Tenant
    api_key: ApiKey
    is_authenticated: bool = True

    @property
    def tenant_id(self) -> str:
        return str(self.tenant.id)


class ApiKeyAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[TenantPrincipal, ApiKey] | None:
        token = bearer_token(get_authorization_header(request))
        if token is None:
            return None
        key = api_key_authenticate(token)
        return TenantPrincipal(tenant=key.tenant, api_key=key), key

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'


class IsTenant(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        if not isinstance(request.user, TenantPrincipal):
            raise ApiKeyMissing()
        return True
