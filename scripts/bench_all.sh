#!/usr/bin/env bash
# Every benchmark; rewrites the results section of BENCHMARKS.md.
# Numbers are only comparable within one run on one machine: compare side by side
# (scripts/bench_gate.py), never against a figure from another day.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
PY="$(pwd)/.venv/bin/python"
OUT="$(mktemp)"

{
    echo "## Results"
    echo
    echo "Run: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)."
    echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GB, $("$PY" --version)."
    echo
    echo "### HTTP metrics (scripts/bench_http_metrics.py: Django's ASGI handler in one process, the three middleware setups interleaved)"
    echo
    "$PY" scripts/bench_http_metrics.py
    echo
    echo "### Stages in memory (scripts/bench_stages.py, single calls)"
    echo
    "$PY" scripts/bench_stages.py --percentiles 2000
    echo
    echo "### The real-time path (scripts/bench_path.py: the gateway on uvicorn + a real-time Celery worker + Postgres + Redis, echo worker)"
    echo
    "$PY" scripts/bench_path.py --requests "${BENCH_REQUESTS:-400}"
    echo
    echo "### Time to first token and streamed throughput (scripts/bench_ttft.py), gateway on uvicorn (uvloop, httptools: the default)"
    echo
    "$PY" scripts/bench_ttft.py --server uvicorn
    echo
    echo "### The same with Daphne as the gateway's server, side by side"
    echo
    "$PY" scripts/bench_ttft.py --server daphne
    echo
    echo "### The same with the real-time workers on Celery's prefork pool (16 processes each) instead of threads, side by side"
    echo
    "$PY" scripts/bench_ttft.py --server uvicorn --worker-pool prefork
    echo
    echo "### A batch job beside real-time traffic, side by side with 75eb38a (scripts/bench_batch.py: 10,000 echo prompts of a tenant without documents; real-time requests with RAG over 1,000; the batch worker at nice 0 and 10)"
    echo
    "$PY" scripts/bench_batch.py --baseline 75eb38a
} >"$OUT"

# Keep the hand-written part of BENCHMARKS.md (everything before "## Results").
if [[ -f BENCHMARKS.md ]]; then
    sed '/^## Results$/,$d' BENCHMARKS.md >"$OUT.head"
else
    printf '# Benchmarks\n\n' >"$OUT.head"
fi
cat "$OUT.head" "$OUT" >BENCHMARKS.md
rm -f "$OUT" "$OUT.head"
echo "wrote BENCHMARKS.md"
