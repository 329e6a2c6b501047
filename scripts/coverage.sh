#!/usr/bin/env bash
# Branch coverage of the whole suite (subprocesses included: Celery workers, Daphne),
# with a floor of 90 % on orchestrator_site, pipeline, batches and workers. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$(pwd)/.venv/bin"

rm -f .coverage .coverage.*
"$BIN/coverage" run -m pytest "$@"
"$BIN/coverage" combine -q
"$BIN/coverage" report --include="orchestrator_site/*,pipeline/*,batches/*,workers/*" | grep '^TOTAL'
"$BIN/python" scripts/coverage_check.py --floor "${COVERAGE_FLOOR:-90}" orchestrator_site pipeline batches workers
