"""A config's problems, as a person can act on them: the key's path, the file's line,
the value that was given and what is allowed, and a suggestion for a misspelt key
or name. Every problem of a file is reported at once.

Pydantic's errors carry the path; the wording here replaces its messages, which
name Python types ("Input should be a valid integer") rather than TOML's.
"""

from __future__ import annotations

import json
import re
import tomllib
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline.config.schema import REFERENCE_ERROR, PipelineSettings, reference_problems, suggestion

Path = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem: ``path`` is dotted (``workers.openai.retry.attempts``), empty for
    the file as a whole; ``line`` is the file's, when the key is in it."""

    path: str
    message: str
    line: int | None = None

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dotted(path: Sequence[str | int]) -> str:
    return ".".join(str(part) for part in path)


def show(value: object) -> str:
    """A value as TOML would write it (a table or array only named, not dumped)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # a bound of 0.0 reads as TOML's 0
    return str(value)


def key_lines(text: str) -> dict[Path, int]:
    """The line (1-based) where each key, table and array item of ``text`` first appears.

    tomllib keeps no positions, and tomlkit, which keeps a document's layout, keeps
    no line numbers either. So the file is parsed in growing prefixes, one line more
    each time: the keys a prefix adds belong to its first line of content. A prefix
    that ends inside a multi-line value does not parse and is passed over. Only run
    for a file that has problems, so its cost (a parse per line) is paid rarely.
    """
    lines = text.splitlines(keepends=True)
    found: dict[Path, int] = {}
    start = 0
    for end in range(1, len(lines) + 1):
        prefix = _parsed("".join(lines[:end]))
        if prefix is None:
            continue  # inside a multi-line value
        new = [path for path in _paths(prefix, ()) if path not in found]
        if new:
            first = next((i for i in range(start, end) if lines[i].strip() and not lines[i].lstrip().startswith("#")), start)
            for path in new:
                found[path] = first + 1
        start = end
    return found


def _parsed(text: str) -> dict[str, Any] | None:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None


def _paths(value: object, at: Path) -> Iterator[Path]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield (*at, key)
            yield from _paths(item, (*at, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield (*at, index)
            yield from _paths(item, (*at, index))


def line_of(path: Path, lines: Mapping[Path, int]) -> int | None:
    """The line of ``path``, else of the nearest table above it that the file has."""
    for cut in range(len(path), 0, -1):
        if path[:cut] in lines:
            return lines[path[:cut]]
    return None


def _model_at(path: Path) -> type[BaseModel] | None:
    """The model class whose table ``path`` names (through dicts and arrays of models)."""
    current: Any = PipelineSettings
    for part in path:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        else:
            current = _element_type(current)
            if current is None:
                return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _element_type(annotation: Any) -> Any:
    """What a dict or tuple annotation holds (``dict[str, X]`` and ``tuple[X, ...]``: X)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is dict and len(args) == 2:
        return args[1]
    if origin is tuple and args:
        return args[0]
    return None


_NOT_A = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "tuple_type": "an array",
    "list_type": "an array",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}


def describe(error: Mapping[str, Any]) -> str:
    """One pydantic error in words: the value given, and what is allowed."""
    kind, ctx, got = error["type"], error.get("ctx") or {}, show(error.get("input"))
    if kind == "missing":
        return "is required"
    if kind in _NOT_A:
        return f"{got} is not {_NOT_A[kind]}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = {"greater_than_equal": "the least allowed is {ge}", "greater_than": "it must be more than {gt}"}.get(kind, "")
        bound = bound or {"less_than_equal": "the most allowed is {le}", "less_than": "it must be less than {lt}"}[kind]
        size = "small" if kind.startswith("greater") else "large"
        return f"{got} is too {size}: " + bound.format(**{k: show(v) for k, v in ctx.items()})
    if kind == "string_too_short":
        return f"{got} is too short: at least {ctx['min_length']} character(s)"
    if kind == "string_too_long":
        return f"{got} is too long: at most {ctx['max_length']} characters"
    if kind == "string_pattern_mismatch":
        return f"{got} does not match {ctx['pattern']}"
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        value = error.get("input")
        hint = suggestion(value, allowed) if isinstance(value, str) else ""
        return f"{got} is not allowed; allowed: " + ", ".join(json.dumps(a) for a in allowed) + hint
    if kind == "value_error":
        return f"{got}: {ctx.get('error', error['msg'])}"
    return f"{got}: {error['msg']}"


def _unknown_key(path: Path) -> str:
    model = _model_at(path[:-1])
    key = str(path[-1])
    if model is None:
        return "unknown key"
    allowed = sorted(model.model_fields)
    hint = suggestion(key, allowed)
    return f"unknown key{hint}" if hint else "unknown key; allowed: " + ", ".join(allowed)


def problems_of(exc: ValidationError | None, raw: Mapping[str, Any], lines: Mapping[Path, int]) -> list[Problem]:
    """Every problem of a parsed file: pydantic's field errors and the cross-field ones."""
    problems: list[Problem] = []
    for error in exc.errors() if exc else []:
        loc: Path = tuple(error["loc"])
        if error["type"] == REFERENCE_ERROR:
            continue  # reported from reference_problems, with the field at fault
        message = _unknown_key(loc) if error["type"] == "extra_forbidden" else describe(error)
        problems.append(Problem(dotted(loc), message, line_of(loc, lines)))
    for loc, message in reference_problems(raw):
        problems.append(Problem(dotted(loc), message, line_of(loc, lines)))
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: (p.line or 0, p.path))
