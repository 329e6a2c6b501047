"""Test lines : code lines, globally and per module (non-blank, non-comment lines;
migrations excluded). Exits 1 when any ratio is below the floor."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MODULES = ("orchestrator_site", "pipeline", "workers", "batches")


def count_lines(path: Path) -> int:
    total = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            total += 1
    return total


def count_tree(root: Path) -> int:
    if not root.exists():
        return 0
    return sum(count_lines(p) for p in sorted(root.rglob("*.py")) if "migrations" not in p.parts and ".venv" not in p.parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=Path(__file__).resolve().parent.parent, type=Path)
    parser.add_argument("--floor", default=1.5, type=float)
    args = parser.parse_args(argv)
    root: Path = args.root
    rows = []
    for module in MODULES:
        code = count_tree(root / module)
        tests = count_tree(root / "tests" / module)
        rows.append((module, code, tests))
    code_total = sum(r[1] for r in rows)
    tests_total = count_tree(root / "tests")
    failed = False
    out = sys.stdout
    out.write(f"{'module':<20}{'code':>8}{'tests':>8}{'ratio':>8}\n")
    for module, code, tests in [*rows, ("TOTAL", code_total, tests_total)]:
        ratio = tests / code if code else float("inf")
        ok = ratio >= args.floor
        failed |= not ok
        out.write(f"{module:<20}{code:>8}{tests:>8}{ratio:>8.2f}{'' if ok else '  < ' + str(args.floor)}\n")
    out.write("ratio check: " + ("FAILED" if failed else "ok") + f" (floor {args.floor}:1)\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
