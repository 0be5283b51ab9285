#!/usr/bin/env bash
# Registry demo on loopback: start a TLS registry, release and publish a signed bundle as
# the coordinator, pull it as a device (verify + activate), predict, then stop the registry.
# Further bundles (e.g. an adapter-only update for the first) are published, pulled and
# run in turn, as later versions of the same model.
#   scripts/registry_demo.sh BUNDLE TRUST_KEY.pub "text" [LATER_BUNDLE ...]
# Env: FEDTUNE_BIN (default .venv/bin/fedtune), REGISTRY_WORK (default registry-demo), MODEL (default banking77),
#      SIGNING_KEY (default: TRUST_KEY with .key for .pub; signs each bundle's release record),
#      PREDICT_ARGS (extra `fedtune edge predict` flags, e.g. --max-new-tokens 8),
#      GATE_RUN (the trained run's folder: each bundle goes out as a release candidate that the
#      run's simulated sites score on their own data, `fedtune gate`, and devices get it only if
#      it passes), GATE_ARGS (extra `fedtune gate` flags, e.g. --max-drop-pt 2).
set -euo pipefail
BUNDLE=$1; TRUST_KEY=$2; TEXT=$3
shift 3
LATER=("$@")
FEDTUNE=${FEDTUNE_BIN:-.venv/bin/fedtune}
PY="$(dirname "$FEDTUNE")/python"
WORK=${REGISTRY_WORK:-registry-demo}
MODEL=${MODEL:-banking77}
SIGNING_KEY=${SIGNING_KEY:-${TRUST_KEY%.pub}.key}
mkdir -p "$WORK"
[ -f "$WORK/pki/ca.pem" ] || "$FEDTUNE" certs create --out "$WORK/pki" --host 127.0.0.1 --host localhost >/dev/null
[ -f "$WORK/publish.token" ] || "$FEDTUNE" registry token --out "$WORK/publish.token" >/dev/null
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

"$FEDTUNE" registry serve --store "$WORK/store" --address "127.0.0.1:$PORT" --cert "$WORK/pki/server.pem" \
  --key "$WORK/pki/server.key" --token-file "$WORK/publish.token" --trust-key "$TRUST_KEY" &
PID=$!
echo "$PID" > "$WORK/registry.pid"
stop() { kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; echo "registry (pid $PID) stopped"; }
trap stop EXIT
for _ in $(seq 1 100); do
  "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 0.2)" 2>/dev/null && break
  kill -0 "$PID" 2>/dev/null || { echo "registry failed to start" >&2; exit 1; }
  sleep 0.2
done

for B in "$BUNDLE" ${LATER[@]+"${LATER[@]}"}; do
  V=$(basename "$B")
  R="$WORK/releases/$MODEL/$V"
  if [ -n "${GATE_RUN:-}" ]; then
    # shellcheck disable=SC2086
    "$FEDTUNE" gate "$GATE_RUN" --bundle "$B" --model "$MODEL" --version "$V" --key "$SIGNING_KEY" \
      --registry "127.0.0.1:$PORT" --registry-ca "$WORK/pki/ca.pem" --token-file "$WORK/publish.token" \
      --trust-key "$TRUST_KEY" ${GATE_ARGS:-}
  else
    [ -d "$R" ] || "$FEDTUNE" release "$B" --model "$MODEL" --version "$V" --key "$SIGNING_KEY" --out "$R"
    "$FEDTUNE" registry publish "$R" --registry "127.0.0.1:$PORT" \
      --token-file "$WORK/publish.token" --ca "$WORK/pki/ca.pem"
  fi
  "$FEDTUNE" edge pull --registry "127.0.0.1:$PORT" --model "$MODEL" --trust-key "$TRUST_KEY" \
    --into "$WORK/device" --ca "$WORK/pki/ca.pem"
  # shellcheck disable=SC2086
  "$FEDTUNE" edge predict "$WORK/device/current" "$TEXT" --trust-key "$TRUST_KEY" ${PREDICT_ARGS:-}
done
