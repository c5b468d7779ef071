#!/usr/bin/env bash
# Reproduces docs/prefect-ui-retrain.png, the README's picture of a finished retrain run in the Prefect UI:
# a real `prefect server start` on loopback, one `scoft run` against it in a fresh clone (the tests'
# tiny-random base at 16 steps, so it takes minutes, not the planted base's quarter hour), then headless
# Chromium (Debian's `chromium` package) on the run's page. Leaves nothing running.
#
#     docs/ui-screenshot.sh [OUT.png]      # from the repository root, after `make install`
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(realpath -m "${1:-$ROOT/docs/prefect-ui-retrain.png}")
WORK=$(mktemp -d /tmp/scoft-ui-XXXX)
PORT=${PORT:-4210}
export PATH="$ROOT/.venv/bin:$PATH" PREFECT_HOME="$WORK/prefect" PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 GX_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1
prefect server start --host 127.0.0.1 --port "$PORT" > "$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
trap 'exit 1' INT TERM  # the EXIT trap then stops the server
until curl -sf "$PREFECT_API_URL/health" > /dev/null; do sleep 1; done

git clone -q "$ROOT" "$WORK/ws" && cd "$WORK/ws"
python - <<'EOF'
import yaml
p = yaml.safe_load(open("params.yaml"))
p["model"]["base"] = "tiny-random"
p["train"].update(max_steps=16, checkpoint_every=4)
p["negatives"]["per_image"] = 1
p["evaluate"].update(samples_per_prompt=2, bootstrap=200)
p["validate"]["cultures"] = ["KOR", "NGA"]
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
EOF
scoft sample --out data/sample > "$WORK/run.log" 2>&1
scoft run >> "$WORK/run.log" 2>&1 || { tail -20 "$WORK/run.log"; exit 1; }
RUN=$(python -c "
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    print(next(r.id for r in c.read_flow_runs() if r.flow_id and c.read_flow(r.flow_id).name == 'retrain'))")
chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1440,1100 \
  --virtual-time-budget=20000 --screenshot="$OUT" "http://127.0.0.1:$PORT/runs/flow-run/$RUN" \
  > "$WORK/chromium.log" 2>&1
echo "wrote $OUT (flow run $RUN)"
