#!/usr/bin/env bash
# `flwr run .` on Flower's managed local SuperLink (Simulation Engine), then stop it.
#
# `flwr run` starts a detached local SuperLink that outlives the command. This script
# gives it a private FLWR_HOME, turns off runtime dependency installation (`uv sync`,
# which would try to download packages), and stops that SuperLink's whole process
# group by PID when the run ends, fails or is interrupted.
#
#   scripts/flwr_run_local.sh [extra `flwr run` args, e.g. --run-config 'num-rounds=2']
# Environment: FEDTUNE_SITES (default 3), FLWR_HOME (default ./.flwr).
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export RAY_USAGE_STATS_ENABLED=0
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "fedtune-local"

[superlink.fedtune-local]
address = ":local-in-memory:"
options.num-supernodes = ${FEDTUNE_SITES:-3}
TOML

marker="$FLWR_HOME/local-superlink/superlink.log"
stop_superlink() {
    local pids
    pids=$(pgrep -f -- "--log-file $marker" || true)
    for pid in $pids; do
        echo "stopping local SuperLink (pid $pid) and its children"
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in $pids; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
}
trap stop_superlink EXIT
flwr run . fedtune-local --stream "$@"
