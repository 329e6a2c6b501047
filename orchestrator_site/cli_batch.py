"""``orchestrator batch submit|status|results``: batch jobs through a gateway's API
(``ORCHESTRATOR_URL``, default ``http://127.0.0.1:8000``; the tenant's key in
``ORCHESTRATOR_API_KEY``). The lines a file may hold are in ``item_of`` and the
README; a bad line refuses the whole file, naming it, and nothing is submitted.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer

batch_app = typer.Typer(help="Batch jobs through the gateway's API (ORCHESTRATOR_URL, ORCHESTRATOR_API_KEY).", no_args_is_help=True)

DEFAULT_URL = "http://127.0.0.1:8000"
POLL_S = 0.5


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(code)


def _client() -> httpx.Client:
    key = os.environ.get("ORCHESTRATOR_API_KEY", "")
    if not key:
        _fail("ORCHESTRATOR_API_KEY is not set: the tenant's API key (po_…) is needed", 2)
    return httpx.Client(base_url=os.environ.get("ORCHESTRATOR_URL", DEFAULT_URL), headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """A request to the gateway; its error (the API's message, then each field's problems), exit 1."""
    try:
        response = client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        _fail(f"cannot reach the gateway at {client.base_url}: {exc}")
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            fields = (error.get("data") or {}).get("fields") or {}
            detail = f"{error['code']}: {error['message']}" + "".join(f"\n  {name}: {problem}" for name, problems in fields.items() for problem in problems)
        except (ValueError, KeyError, TypeError):
            detail = response.text[:200]
        _fail(f"the gateway answered {response.status_code}: {detail}")
    return response


def item_of(line: str, number: int) -> tuple[str, dict[str, Any]]:
    """One line of FILE.jsonl, or ``ValueError`` saying what is wrong: ``("prompts",
    {"prompt", "custom_id"})``, or ``("requests", line)`` for an OpenAI batch request
    line (``{"custom_id", "method", "url", "body"}``), which keeps its whole body."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"line {number}: not JSON ({exc.msg})") from exc
    if not isinstance(item, dict):
        raise ValueError(f"line {number}: must be a JSON object")
    if "prompt" in item:
        return "prompts", {"prompt": item["prompt"], **({"custom_id": item["custom_id"]} if "custom_id" in item else {})}
    if "body" in item or "url" in item:
        return "requests", item
    raise ValueError(f'line {number}: needs "prompt", or an OpenAI batch request ("custom_id", "method", "url", "body")')


def read_items(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """The file's items and their kind, ``prompts`` or ``requests``: one kind per file."""
    kinds, items = set(), []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if line.strip():
            kind, item = item_of(line, number)
            kinds.add(kind)
            items.append(item)
    if not items:
        raise ValueError("the file has no prompts")
    if len(kinds) > 1:
        raise ValueError("one kind of line per file: prompts, or OpenAI batch requests")
    return kinds.pop(), items


def destination_of(target: str) -> dict[str, str]:
    if target.startswith("file://") and len(target) > len("file://"):
        return {"kind": "file", "path": target[len("file://") :]}
    if target.startswith(("https://", "http://")):
        return {"kind": "webhook", "url": target}  # the gateway checks where it may POST
    if target.startswith("s3://") and len(target) > len("s3://"):
        # The gateway checks the bucket, with its own credentials and AWS_ENDPOINT_URL.
        bucket, _, prefix = target[len("s3://") :].partition("/")
        return {"kind": "s3", "bucket": bucket, "prefix": prefix}
    _fail(f"--to {target}: file://PATH (under the gateway's batch.output_dir), s3://BUCKET/PREFIX or an http(s):// webhook URL", 2)


@batch_app.command("submit")
def submit(
    file: Annotated[Path, typer.Argument(help="JSON lines: prompts, or OpenAI batch request lines.", exists=True, dir_okay=False)],
    priority: Annotated[str, typer.Option(help="high, default or low.")] = "default",
    deadline: Annotated[str, typer.Option(help="ISO 8601: items not run by then expire.")] = "",
    to: Annotated[
        list[str] | None, typer.Option("--to", help="A destination, file://PATH, s3://BUCKET/PREFIX or https://URL (a webhook); may be repeated.")
    ] = None,
    worker: Annotated[str, typer.Option(help="The worker (else the model's, else the default).")] = "",
    model: Annotated[str, typer.Option(help="The model of prompt lines (else the worker's default).")] = "",
    max_tokens: Annotated[int, typer.Option(help="Per item (0: the configured default).")] = 0,
    wait: Annotated[bool, typer.Option("--wait", help="Show the progress until the job ends.")] = False,
) -> None:
    """Submit a job; print it (JSON), or with --wait follow it to its end (exit 1 if an item failed)."""
    try:
        kind, items = read_items(file)
    except (ValueError, UnicodeDecodeError) as exc:
        _fail(f"{file}: {exc}", 2)
    if kind == "requests" and (worker or model or max_tokens):
        _fail(f"{file}: its requests carry their model and max_tokens (body): drop --worker, --model and --max-tokens", 2)
    body: dict[str, Any] = {kind: items, "priority": priority}
    for name, value in (("deadline", deadline), ("worker", worker), ("model", model), ("max_tokens", max_tokens)):
        if value:
            body[name] = value
    if to:
        body["destinations"] = [destination_of(target) for target in to]
    with _client() as client:
        job = _call(client, "POST", "/api/v1/batch", json=body).json()
        if not wait:
            typer.echo(json.dumps(job))
            return
        job = _follow(client, job)
    counts = job["counts"]
    typer.echo(f"job {job['id']}: {job['status']}, {counts['done']} done, {counts['failed']} failed, {counts['expired']} expired", err=True)
    typer.echo(json.dumps(job))
    if job["counts"]["failed"] or job["counts"]["expired"]:
        raise typer.Exit(1)


def _follow(client: httpx.Client, job: dict[str, Any]) -> dict[str, Any]:
    """Poll until the job is completed or cancelled, with a progress bar on stderr."""
    total = job["counts"]["total"]
    shown = 0
    with typer.progressbar(length=total, label=f"job {job['id']}", file=sys.stderr) as bar:
        while True:
            settled = job["counts"]["done"] + job["counts"]["failed"] + job["counts"]["expired"]
            bar.update(settled - shown)
            shown = settled
            if job["status"] in ("completed", "cancelled"):
                return job
            time.sleep(POLL_S)
            job = _call(client, "GET", f"/api/v1/batch/{job['id']}").json()


@batch_app.command("status")
def status(job_id: Annotated[str, typer.Argument(help="The job's id.")]) -> None:
    """Print the job: its status, counts, progress and destinations (JSON)."""
    with _client() as client:
        typer.echo(json.dumps(_call(client, "GET", f"/api/v1/batch/{job_id}").json()))


@batch_app.command("results")
def results(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    follow: Annotated[bool, typer.Option("--follow", help="Print each item as it finishes, until the job ends.")] = False,
) -> None:
    """Print the finished items, one JSON object per line, in index order (with
    --follow: those finished, then each as it finishes)."""
    with _client() as client:
        try:
            # Following, the gateway may say nothing for as long as no item finishes.
            timeout = httpx.Timeout(60, read=None) if follow else client.timeout
            params = {"follow": "true"} if follow else {}
            with client.stream("GET", f"/api/v1/batch/{job_id}/results", params=params, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    _fail(f"the gateway answered {response.status_code}: {response.text[:200]}")
                for line in response.iter_lines():
                    typer.echo(line)
        except httpx.TransportError as exc:
            _fail(f"cannot reach the gateway at {client.base_url}: {exc}")
