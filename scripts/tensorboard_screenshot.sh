#!/usr/bin/env bash
# The README's picture of a run's live view: TensorBoard on loopback over a run folder,
# photographed by headless Chromium (Debian's package, installed once when missing).
#   bash scripts/tensorboard_screenshot.sh runs/<run-id> [docs/tensorboard.png] [filter]
set -euo pipefail
RUN=${1:?usage: tensorboard_screenshot.sh RUN_FOLDER [OUT.png] [TAG_FILTER]}
OUT=${2:-docs/tensorboard.png}
FILTER=${3:-global/val_(accuracy|loss)\$}
BIN=${BIN:-.venv/bin}
PORT=${PORT:-6123}
if ! command -v chromium >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
"$BIN/tensorboard" --logdir "$RUN" --host 127.0.0.1 --port "$PORT" >/tmp/tensorboard-screenshot.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 60); do
  curl -sf "http://127.0.0.1:$PORT/" >/dev/null && break
  sleep 1
done
# Headless Chromium sometimes photographs the charts before their lines are drawn: retry
# until the first chart's plot area holds line pixels (the run's dark colour).
for attempt in 1 2 3 4 5 6; do
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,1100 \
    --virtual-time-budget=90000 --run-all-compositor-stages-before-draw --screenshot="$OUT" \
    "http://127.0.0.1:$PORT/?darkMode=false&forceSvg=true&tagFilter=$FILTER#timeseries" 2>/dev/null
  "$BIN/python" - "$OUT" "${CROP_HEIGHT:-620}" <<'PY' && break
import sys
from PIL import Image

image = Image.open(sys.argv[1]).convert("RGB")

def drawn(box: tuple[int, int, int, int]) -> int:
    return sum(1 for r, g, b in image.crop(box).get_flattened_data() if r < 120 and g < 130 and b < 150)


first = drawn((380, 230, 640, 440))
image.crop((0, 0, 1400, int(sys.argv[2]))).save(sys.argv[1])
sys.exit(0 if first > 50 else 1)
PY
  echo "charts not drawn yet (try $attempt), again"
  [ "$attempt" = 6 ] && { echo "gave up: the charts were never drawn" >&2; exit 1; }
done
echo "wrote $OUT"
