"""The panic scan: what ruff cannot see, on top of its BLE/E722/S101/T20 rules.

Catalogues and fails on:
- a blind ``except Exception``/``BaseException`` not marked as a boundary
  (a comment on the ``except`` line that says ``boundary``);
- a swallowed exception: a handler whose body is only ``pass``, ``...`` or ``continue``;
- a Celery task that does not hand its work to a function with a marked boundary;
- ``assert``, ``print`` and ``breakpoint`` in the packages.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("orchestrator_site", "pipeline", "workers", "batches")
BOUNDARY_MARK = "boundary"


@dataclass(frozen=True)
class Finding:
    path: Path
    line: int
    rule: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.text}"


def _is_blind(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("Exception", "BaseException") for n in names)


def _swallows(handler: ast.ExceptHandler) -> bool:
    body = handler.body
    return all(isinstance(s, ast.Pass | ast.Continue) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)) for s in body)


def _boundary_functions(tree: ast.Module, lines: list[str]) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ExceptHandler) and _is_blind(sub) and BOUNDARY_MARK in lines[sub.lineno - 1]:
                    found.add(node.name)
    return found


def _task_targets(tree: ast.Module) -> list[tuple[int, str, str | None]]:
    """(line, task name, the one function it calls) for each @shared_task / @app.task."""
    out = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        decorators = [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
        if not any((isinstance(d, ast.Name) and d.id == "shared_task") or (isinstance(d, ast.Attribute) and d.attr == "task") for d in decorators):
            continue
        body = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        target = None
        if len(body) == 1 and isinstance(body[0], ast.Expr | ast.Return) and isinstance(body[0].value, ast.Call):
            func = body[0].value.func
            target = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        out.append((node.lineno, node.name, target))
    return out


def scan(root: Path) -> list[Finding]:
    findings: list[Finding] = []
    boundaries: set[str] = set()
    tasks: list[tuple[Path, int, str, str | None]] = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            source = path.read_text(encoding="utf-8")
            lines = source.splitlines()
            tree = ast.parse(source, filename=str(path))
            rel = path.relative_to(root)
            boundaries |= _boundary_functions(tree, lines)
            tasks += [(rel, *t) for t in _task_targets(tree)]
            for node in ast.walk(tree):
                if isinstance(node, ast.ExceptHandler):
                    if _is_blind(node) and BOUNDARY_MARK not in lines[node.lineno - 1]:
                        findings.append(Finding(rel, node.lineno, "blind-except", lines[node.lineno - 1].strip()))
                    if _swallows(node):
                        findings.append(Finding(rel, node.lineno, "swallowed-exception", lines[node.lineno - 1].strip()))
                elif isinstance(node, ast.Assert):
                    findings.append(Finding(rel, node.lineno, "assert", lines[node.lineno - 1].strip()))
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("print", "breakpoint"):
                    findings.append(Finding(rel, node.lineno, node.func.id, lines[node.lineno - 1].strip()))
    for rel, line, name, target in tasks:
        if target is None or target not in boundaries:
            findings.append(Finding(rel, line, "task-without-boundary", f"task {name} must call one function with a marked boundary (calls {target})"))
    return findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=Path(__file__).resolve().parent.parent, type=Path)
    args = parser.parse_args(argv)
    findings = scan(args.root)
    for finding in findings:
        sys.stdout.write(f"{finding}\n")
    sys.stdout.write(f"panic scan: {len(findings)} found\n")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
