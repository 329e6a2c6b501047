#!/usr/bin/env bash
# `make test`: set up, run the quality gates, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
BIN="$(pwd)/.venv/bin"

echo "== ruff"; "$BIN/ruff" check . && "$BIN/ruff" format --check .
echo "== mypy"; "$BIN/mypy" .
echo "== panic scan"; scripts/panic_scan.sh
echo "== ratio check"; scripts/ratio_check.sh
# The migration-history check connects to the database: make sure it exists (on a
# fresh machine it did not, and the check waited 10 s for a connection, then warned).
echo "== migrations"; "$BIN/python" scripts/ensure_database.py && "$BIN/python" manage.py makemigrations --check --dry-run >/dev/null
echo "== pytest"
# The whole suite under branch coverage (floors: scripts/coverage_check.py).
# pytest exits 5 when it collected no test: that is a failure here too.
scripts/coverage.sh "$@"
echo "== benchmark regression gate"
"$BIN/python" scripts/bench_gate.py
echo "== mutation pass"
# mutmut over the core files this change touched (the bench gate's base), within 10
# minutes (what is left is reported, not failed). Reported, not yet a gate: the core's
# modules are not all at 80 % yet (docs/testing.md); --gate fails a module under it.
scripts/mutation.sh --changed --time-cap "${MUTATION_TIME_CAP_S:-600}"
