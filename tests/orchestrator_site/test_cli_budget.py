"""``orchestrator budget``: set and list budgets, run as installed, against the test
database and Redis."""

from __future__ import annotations

import os
import subprocess
from decimal import Decimal

import pytest

from pipeline.models import Budget, BudgetScope
from pipeline.resilience import budget
from pipeline.shared_redis import get_redis
from tests.conftest import TenantFixture, _database_url
from tests.orchestrator_site.test_cli import SCRIPT

pytestmark = pytest.mark.django_db(transaction=True)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": _database_url()}
    return subprocess.run([str(SCRIPT), "budget", *args], capture_output=True, text=True, timeout=60, env=env, check=False)


def test_set_creates_then_changes_budgets_on_a_tenant_a_key_and_a_session(owner: TenantFixture) -> None:
    done = run("set", "5", "--tenant", "owner", "--period", "day")
    assert done.returncode == 0, done.stderr
    item = Budget.objects.get(tenant=owner.tenant, scope=BudgetScope.TENANT)
    assert done.stdout == f"budget {item.id}: owner tenant: 5.000000 USD day\n"
    assert run("set", "7.5", "--tenant", "owner").returncode == 0  # the same budget, changed
    item.refresh_from_db()
    assert (item.amount_usd, item.period) == (Decimal("7.5"), "month")
    prefix = owner.issued.api_key.prefix
    assert run("set", "1", "--key", prefix, "--period", "total").returncode == 0
    assert run("set", "0.25", "--tenant", "owner", "--session", "chat-1").returncode == 0
    assert sorted((b.scope, str(b.amount_usd)) for b in Budget.objects.filter(tenant=owner.tenant)) == [
        ("key", "1.000000"),
        ("session", "0.250000"),
        ("tenant", "7.500000"),
    ]
    # Each change reached Redis when it committed, from the command's own process.
    shared = get_redis()
    definitions = shared.client.hgetall(budget.definitions_key(shared.prefix, str(owner.tenant.id)))
    assert definitions["tenant"].endswith("|7500000000|month|tenant") and "session:chat-1" in definitions
    listed = run("list", "--tenant", "owner")
    assert listed.returncode == 0 and "session chat-1" in listed.stdout and f"key {prefix}" in listed.stdout and "never" in listed.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("set", "5"), "name one target"),
        (("set", "5", "--tenant", "owner", "--key", "pk_x"), "name one target"),
        (("set", "five", "--tenant", "owner"), "'five' is not an amount of USD"),
        (("set", "--tenant", "owner", "--", "-1"), "a budget is an amount of USD, 0 or more"),
        (("set", "NaN", "--tenant", "owner"), "a budget is an amount of USD, 0 or more"),
        (("set", "5", "--tenant", "owner", "--period", "week"), "period must be one of day, month, total"),
        (("set", "5", "--tenant", "nobody"), "no tenant named 'nobody'"),
        (("set", "5", "--key", "pk_nothing"), "no single live API key starts 'pk_nothing'"),
    ],
)
def test_set_refuses_what_it_cannot_do_with_a_message_and_status_1(owner: TenantFixture, args: tuple[str, ...], message: str) -> None:
    done = run(*args)
    assert (done.returncode, done.stdout) == (1, "") and message in done.stderr
    assert not Budget.objects.exists()


def test_budget_commands_without_postgres_say_so() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LOG_LEVEL"}
    env |= {"DATABASE_URL": "postgres://postgres@127.0.0.1:1/nothing", "DATABASE_POOL_TIMEOUT_S": "1"}
    for args in (("list",), ("set", "5", "--tenant", "owner")):
        done = subprocess.run([str(SCRIPT), "budget", *args], capture_output=True, text=True, timeout=60, env=env, check=False)
        assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
        assert "Postgres" in done.stderr or "postgres" in done.stderr


def test_every_budget_command_has_help() -> None:
    for command in ("set", "list"):
        done = subprocess.run([str(SCRIPT), "budget", command, "--help"], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0 and f"Usage: orchestrator budget {command}" in done.stdout


def test_list_shows_what_each_budget_has_spent_and_has_left(owner: TenantFixture) -> None:
    import datetime as dt

    from pipeline.models import UsageEntry

    # Spent before the budget existed: a budget new in its period starts from the ledger.
    UsageEntry.objects.create(tenant=owner.tenant, request_id="r", worker="w", model="m", cost_usd=Decimal("0.5"), created_at=dt.datetime.now(tz=dt.UTC))
    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("2"), period="total")
    listed = run("list")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "owner" in line)
    assert "2.000000" in row and "0.5" in row and "1.5" in row and "never" in row
