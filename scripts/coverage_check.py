"""Per-package branch-coverage floors over a combined coverage data file.

python scripts/coverage_check.py [--data-file .coverage] [--floor 90] pipeline batches workers
"""

from __future__ import annotations

import argparse
import io
import sys

import coverage
from coverage.exceptions import NoDataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-file", default=".coverage")
    parser.add_argument("--floor", type=float, default=90.0)
    parser.add_argument("packages", nargs="+")
    args = parser.parse_args(argv)
    cov = coverage.Coverage(data_file=args.data_file)
    cov.load()
    failed = False
    for package in args.packages:
        try:
            percent = cov.report(include=[f"{package}/*"], file=io.StringIO())
        except NoDataError:
            percent = 0.0
        ok = percent >= args.floor
        failed |= not ok
        sys.stdout.write(f"coverage of {package}: {percent:.1f}% (floor {args.floor:g}%){'' if ok else '  FAILED'}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
