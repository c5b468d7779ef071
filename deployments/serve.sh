#!/usr/bin/env bash
# `make serve`: the whole loop on this machine, for a newcomer. A Prefect server on loopback, the cpu
# and gpu work pools, every deployment of deployments/prefect.yaml, the recovery automations, one
# worker per pool running flows in this checkout, and the insiders' review app. Ctrl-C stops all of it (each started in a process
# group of its own, flow runs included), leaving nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${SCOFT_SERVE_PORT:-4200}"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api" SCOFT_WORKSPACE="${SCOFT_WORKSPACE:-$PWD}"
mkdir -p .prefect
groups=()
descendants() { local c; for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done; }
stop() {
  # Ignore a second signal while cleaning up: Ctrl-C reaches make too, and make passes it on.
  trap '' INT TERM
  trap - EXIT
  # A worker starts each flow run in a session of its own, out of reach of its group: collect every
  # descendant first, then stop groups and descendants alike.
  local all=()
  for g in "${groups[@]}"; do all+=($(descendants "$g")); done
  for g in "${groups[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done
  for p in "${all[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 2
  for g in "${groups[@]}"; do kill -KILL -- "-$g" 2>/dev/null || true; done
  for p in "${all[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  echo "serve: stopped the server and the workers"
}
trap stop EXIT INT TERM
start() { setsid "$@" & groups+=("$!"); }

start prefect server start --host 127.0.0.1 --port "$PORT" > .prefect/server.log 2>&1
python - "$PREFECT_API_URL/health" <<'PY'
import sys, time, urllib.request
for _ in range(360):
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2); sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit("serve: the Prefect server did not start, see .prefect/server.log")
PY
prefect work-pool create cpu --type process --overwrite > /dev/null
prefect work-pool create gpu --type process --base-job-template deployments/gpu-process-job-template.json --overwrite > /dev/null
prefect --no-prompt deploy --prefect-file deployments/prefect.yaml --all > .prefect/deploy.log
scoft recovery
[ -d data/sample ] || scoft sample --out data/sample
start prefect worker start --pool cpu > .prefect/worker-cpu.log 2>&1
start prefect worker start --pool gpu --limit 1 > .prefect/worker-gpu.log 2>&1
REVIEW_PORT="${SCOFT_REVIEW_PORT:-8700}"
start scoft review serve --host 127.0.0.1 --port "$REVIEW_PORT" > .prefect/review.log 2>&1
echo "serve: Prefect UI at http://127.0.0.1:$PORT, insiders' review app at http://127.0.0.1:$REVIEW_PORT (logs in .prefect/), Ctrl-C to stop"
wait
