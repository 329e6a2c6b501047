#!/usr/bin/env bash
# Zero "panics": ruff's blind-except/bare-except/assert/print rules on the packages,
# then the AST scan for what ruff cannot see (swallowed exceptions, tasks without a boundary).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${1:-.}"
BIN="${VENV_BIN:-$(pwd)/.venv/bin}"
status=0
(cd "$ROOT" && "$BIN/ruff" check --no-cache --isolated --select BLE,E722,S101,T20 --exclude '*/migrations/*' orchestrator_site pipeline workers batches) || status=1
"$BIN/python" scripts/panic_scan.py --root "$ROOT" || status=1
exit $status
