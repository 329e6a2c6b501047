#!/usr/bin/env bash
# Creates .venv and installs the pinned requirements. Re-running is cheap:
# a stamp file records the hash of the requirement files, and nothing is
# reinstalled while it matches.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.requirements.sha256"
want="$(cat requirements/*.txt | sha256sum | cut -d' ' -f1)"

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
if [[ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]]; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r requirements/dev.txt
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --require-hashes -r requirements/llama.txt
    echo "$want" > "$STAMP"
fi
