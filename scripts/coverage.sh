#!/usr/bin/env bash
# Branch coverage of the whole suite (subprocesses included), with a floor of 90 %
# on pipeline, batches and workers. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$(pwd)/.venv/bin"
FLOOR="${COVERAGE_FLOOR:-90}"

rm -f .coverage .coverage.*
"$BIN/coverage" run -m pytest "$@"
"$BIN/coverage" combine -q
"$BIN/coverage" report --skip-covered >/dev/null  # writes nothing; fills the data for the per-package checks
status=0
for package in pipeline batches workers; do
    if ! "$BIN/coverage" report --include="$package/*" --fail-under="$FLOOR" --format=total >/tmp/coverage.$$ 2>&1; then
        echo "coverage of $package: $(cat /tmp/coverage.$$)% (floor $FLOOR%)"
        status=1
    else
        echo "coverage of $package: $(cat /tmp/coverage.$$)% (floor $FLOOR%) ok"
    fi
done
rm -f /tmp/coverage.$$
"$BIN/coverage" report --include="orchestrator_site/*,pipeline/*,batches/*,workers/*" | grep '^TOTAL' 
exit $status
