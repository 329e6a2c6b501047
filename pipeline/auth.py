"""Tenant API keys: generation, hashing, and DRF authentication by ``Authorization: Bearer``
(or ``x-api-key``)."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import DatabaseError, transaction
from django.utils import timezone
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from orchestrator_site.errors import ApiKeyInvalid, ApiKeyMissing, ApiKeyRevoked, ServiceUnavailable
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
    key_cache.clear()  # this process at once; every other within API_KEY_CACHE_S


def api_key_authenticate(raw: str) -> ApiKey:
    """The key's row (with its tenant), or the error that says why not."""
    if not raw.startswith(KEY_PREFIX):
        raise ApiKeyInvalid()
    try:
        key = ApiKey.objects.select_related("tenant").get(key_hash=hash_key(raw))
    except ApiKey.DoesNotExist as exc:
        raise ApiKeyInvalid() from exc
    except DatabaseError as exc:
        # Postgres is down and the key is not in the cache: nothing can vouch for it.
        raise ServiceUnavailable("the key store is unavailable; retry shortly", data={"service": "postgres"}, retry_after=5.0) from exc
    if key.is_revoked or not key.tenant.is_active:
        raise ApiKeyRevoked()
    return key


class KeyCache:
    """The gateway's keys, each kept for ``API_KEY_CACHE_S`` after Postgres vouched
    for it: an API request then costs no query (and no thread hop) to authenticate.
    A revocation or a tenant's deactivation reaches this process at once when made
    here (``api_key_revoke``, the admin), every other gateway within the TTL. Only
    accepted keys are kept; a refused one is asked of Postgres every time."""

    MAX_ENTRIES = 10_000

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, ApiKey]] = {}
        self._lock = threading.Lock()

    def get(self, raw: str) -> ApiKey | None:
        entry = self._entries.get(hash_key(raw))
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def put(self, raw: str, key: ApiKey) -> None:
        ttl = float(settings.API_KEY_CACHE_S)
        if ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()  # a flood of distinct keys: start over rather than grow
            self._entries[hash_key(raw)] = (time.monotonic() + ttl, key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


key_cache = KeyCache()


def forget_cached_keys(**_: Any) -> None:
    key_cache.clear()


def api_key_authenticate_cached(raw: str) -> ApiKey:
    """``api_key_authenticate``, answered from ``key_cache`` while the key is in it."""
    key = key_cache.get(raw)
    if key is None:
        key = api_key_authenticate(raw)
        key_cache.put(raw, key)
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


def request_token(authorization: bytes | str, x_api_key: bytes | str | None) -> str | None:
    """The key of a request: ``Authorization: Bearer <key>``, or ``x-api-key: <key>`` as
    Anthropic-style clients send it (when both are sent, the bearer token)."""
    token = bearer_token(authorization)
    if token is not None or not x_api_key:
        return token
    raw = (x_api_key.decode("latin-1") if isinstance(x_api_key, bytes) else x_api_key).strip()
    if not raw:
        raise ApiKeyInvalid("x-api-key is empty")
    return raw


class ApiKeyAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[TenantPrincipal, ApiKey] | None:
        token = request_token(get_authorization_header(request), request.META.get("HTTP_X_API_KEY"))
        if token is None:
            return None
        key = api_key_authenticate_cached(token)
        return TenantPrincipal(tenant=key.tenant, api_key=key), key

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'


class IsTenant(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        if not isinstance(request.user, TenantPrincipal):
            raise ApiKeyMissing()
        return True
