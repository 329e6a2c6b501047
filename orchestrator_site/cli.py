"""``orchestrator``: the operator's command line (a console script of the project).

    orchestrator validate FILE [--json]   exit 0 when valid, else 1 and every problem
    orchestrator schema [--markdown]      the config's JSON Schema (or its reference page)
    orchestrator explain FILE             what a config makes the platform do
    orchestrator config ...               the config versions kept in Postgres
    orchestrator budget ...               spend budgets on tenants, keys and sessions
    orchestrator batch ...                batch jobs through a gateway's API (``cli_batch``)

Commands that read files only need no database; ``config`` and ``budget`` set Django up;
``batch`` talks to a gateway over HTTP, as a tenant.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from orchestrator_site.cli_batch import batch_app
from orchestrator_site.errors import ConfigInvalid
from pipeline.config.loading import check_text, read_text
from pipeline.config.problems import Problem

app = typer.Typer(help="prompt-orchestrator's command line.", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
FileArg = Annotated[Path, typer.Argument(help="A pipeline.toml file.", dir_okay=False)]


def _problems_of(file: Path) -> tuple[str, tuple[Problem, ...]]:
    """The file's text and its problems (a file that cannot be read is one problem)."""
    if not file.exists():
        return "", (Problem("", "no such file"),)
    try:
        text = read_text(file)
    except ConfigInvalid as exc:
        return "", tuple(Problem(**p) for p in exc.data["problems"])
    return text, check_text(text).problems


@app.command()
def validate(file: FileArg, as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False) -> None:
    """Check a config file: exit 0 when it is valid, 1 with every problem when not."""
    _, problems = _problems_of(file)
    if as_json:
        typer.echo(json.dumps({"file": str(file), "valid": not problems, "problems": [p.to_dict() for p in problems]}, indent=2))
    elif problems:
        typer.echo("\n".join(p.render(str(file)) for p in problems))
        typer.echo(f"{len(problems)} problem{'s' if len(problems) > 1 else ''}", err=True)
    else:
        typer.echo(f"{file}: valid")
    raise typer.Exit(1 if problems else 0)


@app.command()
def schema(as_markdown: Annotated[bool, typer.Option("--markdown", help="Print the reference page (docs/configuration.md) instead.")] = False) -> None:
    """Print the config's JSON Schema (draft 2020-12), for editors and CI."""
    from pipeline.config.reference import json_schema_text, markdown

    sys.stdout.write(markdown() if as_markdown else json_schema_text())


@app.command()
def explain(file: FileArg) -> None:
    """Describe in plain words what a config makes the platform do."""
    from pipeline.config.explain import explain as explain_config
    from pipeline.config.loading import parse_config

    text, problems = _problems_of(file)
    if problems:
        typer.echo("\n".join(p.render(str(file)) for p in problems))
        raise typer.Exit(1)
    typer.echo(explain_config(parse_config(text, source=str(file))).text(), nl=False)


config_app = typer.Typer(help="The config versions kept in Postgres (as the admin shows them).", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.callback()
def _django() -> None:
    """Set Django up: these commands read and write the database."""
    import os

    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_site.settings")
    quiet = "LOG_LEVEL" not in os.environ
    os.environ.setdefault("LOG_LEVEL", "ERROR")  # a command's output, not the libraries' chatter
    django.setup()
    if quiet:
        # psycopg gives its logger a level of its own (WARNING): its pool's retries would
        # print before the command says in one line that Postgres cannot be reached.
        logging.getLogger("psycopg").setLevel(logging.ERROR)


def _fail(message: str) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(1)


@contextmanager
def _refusals(store: str = "the config versions") -> Iterator[None]:
    """The errors a config or budget command can meet, as a message and exit status 1."""
    from django.db import DatabaseError

    from orchestrator_site.errors import OrchestratorError

    try:
        yield
    except ConfigInvalid as exc:
        problems = tuple(Problem(**p) for p in exc.data.get("problems", []))
        _fail("\n".join(p.render(exc.data.get("file", "pipeline.toml")) for p in problems) or exc.message)
    except OrchestratorError as exc:  # refused (needs a restart, not found) or a service down
        _fail(exc.message)
    except DatabaseError as exc:
        _fail(f"cannot reach {store} in Postgres: {exc}")


@config_app.command("push")
def config_push(
    file: FileArg,
    comment: Annotated[str, typer.Option(help="Why this version.")] = "",
    author: Annotated[str, typer.Option(help="Who made it (default: $USER).")] = "",
    activate: Annotated[bool, typer.Option("--activate", help="Activate it at once, live.")] = False,
) -> None:
    """Store a file as a new version (validated: nothing is stored when invalid)."""
    import getpass

    from pipeline.config.versions import version_activate, version_create
    from pipeline.models import ConfigSource

    with _refusals():
        text = read_text(file) if file.exists() else _fail(f"{file}: no such file")
        who = author or getpass.getuser()
        version = version_create(text=text, source=ConfigSource.CLI, author=who, comment=comment or str(file))
        typer.echo(f"stored version {version.id}")
        if activate:
            version_activate(version_id=version.id, by=who)
            typer.echo(f"version {version.id} is active")


@config_app.command("activate")
def config_activate(
    version: Annotated[int, typer.Argument(help="The version to activate (also a rollback).")],
    at_restart: Annotated[bool, typer.Option("--at-restart", help="For changes that need a restart: processes take it up when they start.")] = False,
) -> None:
    """Make a version the active one, in every process within a second."""
    import getpass

    from pipeline.config.versions import version_activate

    with _refusals():
        version_activate(version_id=version, by=getpass.getuser(), at_restart=at_restart)
    typer.echo(f"version {version} is active" + (" (at restart)" if at_restart else ""))


@config_app.command("history")
def config_history(limit: Annotated[int, typer.Option(help="Versions shown, newest first.")] = 20) -> None:
    """The latest versions: which is active, how it applies, who made it and why."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.config.versions import history

    with _refusals():
        versions = history(limit=limit)
    table = Table("version", "active", "applies", "valid", "source", "author", "comment", "created")
    for v in versions:
        created = v.created_at.strftime("%Y-%m-%d %H:%M:%S") if v.created_at else ""
        table.add_row(
            str(v.id), "*" if v.is_active else "", v.applies if v.is_active else "", "yes" if v.valid else "no", v.source, v.author, v.comment, created
        )
    Console(width=160).print(table)


budget_app = typer.Typer(help="Spend budgets on tenants, API keys and sessions (as the admin shows them).", no_args_is_help=True)
app.add_typer(budget_app, name="budget")
budget_app.callback()(_django)


@budget_app.command("set")
def budget_set(
    amount_usd: Annotated[str, typer.Argument(metavar="USD", help="The most that may be spent per period, in USD.")],
    tenant: Annotated[str, typer.Option("--tenant", help="The tenant's name (with --session: the session's tenant).")] = "",
    key: Annotated[str, typer.Option("--key", help="An API key's prefix: the budget is on that key.")] = "",
    session: Annotated[str, typer.Option("--session", help="A session id of --tenant: the budget is on that session.")] = "",
    period: Annotated[str, typer.Option("--period", help="day, month (UTC) or total.")] = "month",
) -> None:
    """Create or change one budget; the next request reserves against it."""
    from decimal import Decimal, InvalidOperation

    from pipeline.services import budgets

    if bool(key) == bool(tenant) and not (session and tenant):
        _fail("name one target: --tenant NAME, --key PREFIX, or --tenant NAME --session ID")
    try:
        amount = Decimal(amount_usd)
    except InvalidOperation:
        _fail(f"{amount_usd!r} is not an amount of USD")
    with _refusals("the budgets"):
        item = budgets.budget_set(tenant=tenant or None, key_prefix=key or None, session_id=session or None, amount_usd=amount, period=period)
    typer.echo(f"budget {item.id}: {item}")


@budget_app.command("list")
def budget_list(tenant: Annotated[str, typer.Option("--tenant", help="Only this tenant's.")] = "") -> None:
    """Every budget, with what it has spent and has left in its period."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.models import Budget
    from pipeline.services import budgets

    with _refusals("the budgets"):
        items = Budget.objects.select_related("tenant", "api_key")
        standings = budgets.standings(items.filter(tenant__name=tenant) if tenant else items)
    table = Table("budget", "tenant", "on", "period", "USD", "spent", "left", "resets (UTC)")
    for standing in standings:
        item = standing.item
        target = {"key": f"key {item.api_key.prefix if item.api_key else ''}", "session": f"session {item.session_id}"}.get(item.scope, "tenant")
        resets = standing.resets_at.strftime("%Y-%m-%d %H:%M") if standing.resets_at else "never"
        table.add_row(
            str(item.id),
            item.tenant.name,
            target,
            item.period,
            str(item.amount_usd),
            str(budgets.usd(standing.spent_nano)),
            str(budgets.usd(standing.remaining_nano)),
            resets,
        )
    Console(width=160).print(table)


app.add_typer(batch_app, name="batch")


def main() -> None:
    app()
