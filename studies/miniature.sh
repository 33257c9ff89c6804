#!/usr/bin/env bash
# The miniature study behind RESULTS.md: every method x 5 seeds on both settings, the TRB sweep (eps0 x horizon),
# and the continuation probe. Resumable: rerun the same command and finished runs are kept.
#
#   studies/miniature.sh [OUT]        (default OUT=runs/study; JOBS=2 runs in parallel)
#
# Tables, CSVs and plots land in OUT/<setting>/{methods,sweep}/ and OUT/<setting>/probe/.
set -euo pipefail
OUT=${1:-runs/study}
JOBS=${JOBS:-2}
TRB=${TRB:-trb}
for SETTING in arith word; do
  CONFIG="trb:configs/miniature_${SETTING}.yaml"
  # Horizons are the paper's K in {15, 25, 50} of ~400 steps, scaled to this setting's step count.
  HORIZONS=$(python - "$CONFIG" <<'PY'
import sys
from trb.config import load_config
steps = load_config(sys.argv[1]).steps
print("|".join(str(max(1, round(k * steps / 400))) for k in (15, 25, 50)))
PY
)
  MID=$(echo "$HORIZONS" | cut -d'|' -f2)
  $TRB compare "$CONFIG" --out "$OUT/$SETTING/methods" --jobs "$JOBS" --seeds 0 1 2 3 4 --methods \
    opd "trb:horizon=$MID" trb_adaptive fixed_eps "temperature:horizon=$MID" "sft_warmup:prompt_steps=$MID" \
    "veto:horizon=$MID" skd minillm gkd
  $TRB compare "$CONFIG" --out "$OUT/$SETTING/sweep" --jobs "$JOBS" --seeds 0 1 2 --methods \
    opd "trb:eps0=0.001|0.005|0.01|0.02|0.05,horizon=$HORIZONS"
  $TRB probe --student "trb:miniature/$SETTING/student" --teacher "trb:miniature/$SETTING/teacher" \
    --data "$SETTING" --eps 0.02 --out "$OUT/$SETTING/probe"
done
