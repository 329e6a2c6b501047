"""The ``webhook`` destination: a completed job's results POSTed to the tenant's URL.

The results go ``batch.webhook_lines`` at a time, in index order, each POST a JSON
event ``{"type": "batch.results", "timestamp", "data": {"job_id", "lines"}}``, then a
last ``batch.completed`` with the job's counts. Each is signed as Standard Webhooks
sign them: headers ``webhook-id`` (the same for the same lines on every try, so the
receiver can drop a repeat), ``webhook-timestamp`` and ``webhook-signature``
(``v1,`` + base64 HMAC-SHA256 of ``id.timestamp.body`` with the tenant's secret).
A failed POST fails the attempt; the next one resumes after the last lines the
receiver took (``BatchDelivery.lines``).

The URL is checked when the job is submitted and again before each attempt: every
address its host resolves to must be public, or in ``batch.webhook_allow``
(loopback, private, link-local, the cloud metadata address are refused otherwise).
The request goes to the address that was checked (the host keeps its ``Host``
header and TLS name), so a name that resolves elsewhere later cannot redirect it;
a redirect the receiver answers is not followed.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import time
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from django.utils import timezone

from batches.models import BatchDelivery, BatchJob
from orchestrator_site.errors import DeliveryFailed, InvalidRequest
from pipeline.config import PipelineSettings
from pipeline.models import Tenant

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def secret_of(tenant_id: uuid.UUID | str) -> str:
    """The tenant's signing secret, made on first use."""
    made = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    Tenant.objects.filter(pk=tenant_id, webhook_secret="").update(webhook_secret=made)
    return str(Tenant.objects.values_list("webhook_secret", flat=True).get(pk=tenant_id))


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def checked_url(raw: object, config: PipelineSettings) -> tuple[str, Address]:
    """The URL and the address to send to; ``ValueError`` saying why it is refused."""
    if not isinstance(raw, str) or len(raw) > 2048:
        raise ValueError("url must be an http(s) URL of at most 2048 characters")
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("url must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("url must not hold credentials: the POSTs are signed with the tenant's secret instead")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        found = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:  # socket.gaierror is an OSError; a bad port, a ValueError
        raise ValueError(f"url's host {parts.hostname!r} does not resolve: {exc}") from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in found]
    allowed = [ipaddress.ip_network(network, strict=False) for network in config.batch.webhook_allow]
    for address in addresses:
        if not (address.is_global and not address.is_multicast) and not any(address in network for network in allowed):
            raise ValueError(f"url's host resolves to {address}, which is not public (allow it in batch.webhook_allow)")
    return raw, addresses[0]


def validated(field: str, item: dict[str, Any], config: PipelineSettings) -> dict[str, Any]:
    """A webhook destination as submitted, or ``InvalidRequest`` naming its field."""
    extra = set(item) - {"kind", "url"}
    if extra:
        raise InvalidRequest(f"{field}: unknown field {sorted(extra)[0]!r} for a webhook destination", data={"field": f"{field}.{sorted(extra)[0]}"})
    try:
        url, _ = checked_url(item.get("url"), config)
    except ValueError as exc:
        raise InvalidRequest(f"{field}: {exc}", data={"field": f"{field}.url"}) from exc
    return {"kind": "webhook", "url": url}


def deliver(job: BatchJob, delivery: BatchDelivery, config: PipelineSettings) -> int:
    """POST the job's results, from the first line the receiver has not taken, then the
    completion event; the lines delivered. ``DeliveryFailed`` on the first POST refused."""
    from batches.api.serializers import counts
    from batches.services import result_pages

    try:
        url, address = checked_url(delivery.target.get("url"), config)
    except ValueError as exc:
        raise DeliveryFailed(str(exc), data={"reason": str(exc)}) from exc
    secret = secret_of(job.tenant_id)
    with httpx.Client(timeout=config.batch.webhook_timeout_s, follow_redirects=False, trust_env=False) as client:
        # Every item of a completed job has a line: the n-th line is index n - 1.
        for page in result_pages(job, after=delivery.lines - 1, limit=config.batch.webhook_lines):
            message_id = f"msg_{job.id.hex}_{delivery.position}_{page[0]['index']}"
            _post(client, url, address, secret, message_id, {"type": "batch.results", "data": {"job_id": str(job.id), "lines": page}})
            delivery.lines += len(page)
            BatchDelivery.objects.filter(pk=delivery.pk).update(lines=delivery.lines)  # a later attempt resumes here
        completed = {"job_id": str(job.id), "status": job.status, "counts": counts(job, job.items_settled), "lines": delivery.lines}
        _post(client, url, address, secret, f"msg_{job.id.hex}_{delivery.position}_completed", {"type": "batch.completed", "data": completed})
    return delivery.lines


def _post(client: httpx.Client, url: str, address: Address, secret: str, message_id: str, event: dict[str, Any]) -> None:
    parts = urlsplit(url)
    host = f"[{address}]" if address.version == 6 else str(address)
    target = urlunsplit(parts._replace(netloc=f"{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"))
    stamp = int(time.time())
    body = json.dumps({**event, "timestamp": timezone.now().astimezone(dt.UTC).isoformat()}, separators=(",", ":")).encode()
    headers = {
        "Host": parts.netloc,
        "Content-Type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": signature(secret, message_id, stamp, body),
    }
    try:
        response = client.post(target, content=body, headers=headers, extensions={"sni_hostname": parts.hostname} if parts.scheme == "https" else {})
    except httpx.HTTPError as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise DeliveryFailed(f"webhook: {reason}", data={"reason": reason}) from exc
    if response.is_redirect:
        reason = f"HTTP {response.status_code}: a redirect is not followed"
        raise DeliveryFailed(f"webhook: {reason}", data={"reason": reason})
    if not response.is_success:
        reason = f"HTTP {response.status_code}"
        raise DeliveryFailed(f"webhook: {reason}", data={"reason": reason})
