#!/usr/bin/env bash
# Test lines : code lines >= 1.5 globally and per module; prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
exec "$PY" scripts/ratio_check.py "$@"
