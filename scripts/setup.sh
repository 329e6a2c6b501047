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

# The playground's browser test drives Debian's Chromium (tests/pipeline/test_playground.py).
if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        echo "installing chromium and chromium-driver (for the browser test)"
        apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null; }
    else
        echo "warning: /usr/bin/chromium and /usr/bin/chromedriver are missing; the browser test will fail (apt-get install chromium chromium-driver)" >&2
    fi
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
if [[ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]]; then
    echo "installing the pinned requirements into $VENV"
    scripts/quiet-pip "$VENV/bin/pip" install -r requirements/dev.txt
    scripts/quiet-pip "$VENV/bin/pip" install --no-deps --require-hashes -r requirements/llama.txt
    echo "$want" > "$STAMP"
fi
# The project itself, editable: its console script `orchestrator` (pyproject.toml).
if [[ ! -x "$VENV/bin/orchestrator" ]]; then
    scripts/quiet-pip "$VENV/bin/pip" install --no-deps -e .
fi
