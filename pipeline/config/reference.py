"""The config's reference, generated from the schema: the JSON Schema that editors
read (``docs/pipeline.schema.json``) and the table of every key with its type,
default and meaning (``docs/configuration.md``). Tests fail when a committed file
differs from what this module writes, so the docs follow the models."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from pipeline.config.schema import PipelineSettings

DRAFT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID = "https://github.com/prompt-orchestrator/prompt-orchestrator/docs/pipeline.schema.json"

INTRO = """\
# Configuration reference

`pipeline.toml` says what the pipeline does: its workers, the settings of each
stage, limits, retries and circuit breakers, deduplication, batch jobs, log
levels and the concurrency of each process. Infrastructure (the URLs of Postgres,
Redis and the broker) and secrets come from the environment, never from this
file. Every key is optional; a missing file means every default.
`pipeline.example.toml` sets every key.

Check a file with `orchestrator validate pipeline.toml`, read what it does with
`orchestrator explain pipeline.toml`, and point an editor at
[`pipeline.schema.json`](pipeline.schema.json) (`orchestrator schema` prints it)
for completion. How versions are stored and reloaded is in
[operations.md](operations.md).

This page is generated from the schema (`orchestrator schema --markdown`); a test
fails when it drifts from the code.
"""


def json_schema() -> dict[str, Any]:
    """The config's JSON Schema (draft 2020-12), from the pydantic models."""
    schema = PipelineSettings.model_json_schema(mode="validation")
    return {"$schema": DRAFT, "$id": SCHEMA_ID, **schema, "title": "pipeline.toml"}


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def _resolve(node: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = node.get("$ref")
    return defs[ref.rsplit("/", 1)[-1]] if isinstance(ref, str) else node


def _type(node: Mapping[str, Any], defs: Mapping[str, Any]) -> str:
    node_type = node.get("type")
    if "enum" in node:
        return " \\| ".join(json.dumps(v) for v in node["enum"])
    if node_type == "array":
        return f"array of {_type(_resolve(node.get('items', {}), defs), defs)}"
    if node_type == "object" and "additionalProperties" in node and isinstance(node["additionalProperties"], Mapping):
        return f"table of {_type(_resolve(node['additionalProperties'], defs), defs)}"
    return {"integer": "integer", "number": "number", "boolean": "boolean", "string": "string", "object": "table"}.get(str(node_type), str(node_type))


def _bounds(node: Mapping[str, Any]) -> str:
    words = {
        "minimum": "≥",
        "exclusiveMinimum": ">",
        "maximum": "≤",
        "exclusiveMaximum": "<",
        "minLength": "length ≥",
        "maxLength": "length ≤",
        "pattern": "matches",
    }
    parts = [f"{words[key]} {_value(node[key]) if key != 'pattern' else '`' + node[key] + '`'}" for key in words if key in node]
    return ", ".join(parts)


def _value(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, ensure_ascii=False)


def _default(node: Mapping[str, Any]) -> str:
    if "default" not in node:
        return "required"
    text = _value(node["default"]).replace("|", "\\|")
    return f"`{text}`" if len(text) <= 60 else "see `pipeline.example.toml`"


def _tables(node: Mapping[str, Any], defs: Mapping[str, Any], header: str) -> Iterator[tuple[str, str, list[str]]]:
    """(header, description, rows) of the table at ``node`` and each table under it."""
    rows: list[str] = []
    nested: list[tuple[str, Mapping[str, Any]]] = []
    for key, raw in node.get("properties", {}).items():
        prop = _resolve(raw, defs)
        if prop.get("type") == "object" and "properties" in prop:
            nested.append((f"{header}.{key}" if header else key, raw))
            continue
        if prop.get("type") == "object" and isinstance(prop.get("additionalProperties"), Mapping) and "$ref" in prop["additionalProperties"]:
            nested.append((f"{header}.{key}.NAME" if header else f"{key}.NAME", {**raw, **_resolve(prop["additionalProperties"], defs)}))
            continue
        items = prop.get("items", {})
        if prop.get("type") == "array" and "$ref" in items:
            nested.append((f"[{header}.{key}]", {**raw, **_resolve(items, defs)}))
        meaning = (raw.get("description") or prop.get("description") or "").replace("|", "\\|")
        bounds = _bounds(prop)
        rows.append(f"| `{key}` | {_type(prop, defs)} | {_default(raw)} | {meaning}{' (' + bounds + ')' if bounds else ''} |")
    if rows:
        yield header, str(node.get("description", "")), rows
    for sub_header, sub in nested:
        resolved = {**_resolve(sub, defs), "description": sub.get("description", "")}
        yield from _tables(resolved, defs, sub_header)


def markdown() -> str:
    """``docs/configuration.md``: every key of every table, with type, default and meaning."""
    schema = json_schema()
    defs = schema.get("$defs", {})
    out = [INTRO]
    for header, description, rows in _tables(schema, defs, ""):
        out.append(f"\n## `[{header}]`\n\n" if header else "\n## Top level\n\n")
        if description:
            out.append(f"{description}\n")
        out.append("\n| key | type | default | meaning |\n| --- | --- | --- | --- |\n")
        out.append("\n".join(rows) + "\n")
    return "".join(out)
