"""``orchestrator``: the operator's command line (a console script of the project).

    orchestrator validate FILE [--json]   exit 0 when valid, else 1 and every problem
    orchestrator schema [--markdown]      the config's JSON Schema (or its reference page)
    orchestrator explain FILE             what a config makes the platform do
    orchestrator config ...               the config versions kept in Postgres

Commands that read files only need no database; ``config`` sets Django up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

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


def main() -> None:
    app()
