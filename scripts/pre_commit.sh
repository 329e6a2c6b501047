#!/usr/bin/env bash
# The pre-commit gate: format check, ruff, mypy, panic scan, ratio check, then the
# fast tests (those not marked slow). `--no-tests` stops after the static gates.
# `scripts/install_hooks.sh` installs this as .git/hooks/pre-commit.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV_BIN:-$(pwd)/.venv/bin}"
RUN_TESTS=1
if [[ "${1:-}" == "--no-tests" ]]; then RUN_TESTS=0; shift; fi
ROOT="${1:-.}"

step() { printf '== %s\n' "$1"; }
step "format";      (cd "$ROOT" && "$BIN/ruff" format --check --quiet .)
step "ruff";        (cd "$ROOT" && "$BIN/ruff" check --quiet .)
step "mypy";        (cd "$ROOT" && "$BIN/mypy" --no-error-summary .)
step "panic scan";  scripts/panic_scan.sh "$ROOT" >/dev/null || { scripts/panic_scan.sh "$ROOT"; exit 1; }
step "ratio check"; "$BIN/python" scripts/ratio_check.py --root "$ROOT" >/dev/null || { "$BIN/python" scripts/ratio_check.py --root "$ROOT"; exit 1; }
if [[ $RUN_TESTS == 1 ]]; then
    step "fast tests"
    (cd "$ROOT" && "$BIN/python" -m pytest -q -m "not slow" -p no:cacheprovider)
fi
echo "pre-commit: ok"
