from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipeline.auth import api_key_issue, api_key_revoke, tenant_create
from pipeline.models import Tenant


class Command(BaseCommand):
    help = (
        "Create a tenant and print its first API key (shown once). With --reuse, issue a new key for an existing tenant; "
        "with --rotate as well, revoke its earlier keys of the same --key-name (make run does, so its runs leave one key)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--key-name", default="default")
        parser.add_argument("--reuse", action="store_true", help="if the tenant exists, issue it a new key instead of failing")
        parser.add_argument("--rotate", action="store_true", help="with --reuse: revoke the tenant's earlier keys of this --key-name")

    def handle(self, *args: Any, **options: Any) -> None:
        name = options["name"].strip()
        if not name or len(name) > 100:
            raise CommandError("tenant name must be 1-100 characters")
        existing = Tenant.objects.filter(name=name).first()
        if existing is not None:
            if not options["reuse"]:
                raise CommandError(f"tenant {name!r} already exists (use --reuse to issue it a new key)")
            issued = api_key_issue(tenant=existing, name=options["key_name"])
            if options["rotate"]:
                for earlier in existing.api_keys.filter(name=options["key_name"], revoked_at__isnull=True).exclude(pk=issued.api_key.pk):
                    api_key_revoke(api_key=earlier)
        else:
            issued = tenant_create(name=name, key_name=options["key_name"])
        self.stdout.write(issued.raw)
