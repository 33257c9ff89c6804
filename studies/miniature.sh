#!/usr/bin/env bash
# The miniature study behind RESULTS.md: every method x seeds on both settings, the TRB sweep (eps0 x horizon),
# and the continuation probe. Resumable: rerun the same command and finished runs are kept.
#
#   studies/miniature.sh [OUT]        (default OUT=runs/study)
#
# Environment: JOBS runs in parallel (default 2), SEEDS of the method table (default 0 1 2 3 4), SWEEP_SEEDS of the
# sweep (default 0 1 2), THREADS per run (default cores / JOBS), SETTINGS (default "arith word"), PARTS (default "methods sweep probe"),
# METHODS (default: all of the table).
# Tables, CSVs and plots land in OUT/<setting>/{methods,sweep}/ and OUT/<setting>/probe/.
set -euo pipefail
OUT=${1:-runs/study}
JOBS=${JOBS:-2}
TRB=${TRB:-trb}
SEEDS=${SEEDS:-0 1 2 3 4}
SWEEP_SEEDS=${SWEEP_SEEDS:-0 1 2}
PARTS=${PARTS:-methods sweep probe}
THREADS=${THREADS:+--threads $THREADS}
for SETTING in ${SETTINGS:-arith word}; do
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
  LONG=$(echo "$HORIZONS" | cut -d'|' -f3)
  if [[ " $PARTS " == *" methods "* ]]; then
    # shellcheck disable=SC2086
    ALL="opd trb:horizon=$LONG trb_adaptive fixed_eps temperature:horizon=$LONG \
      sft_warmup:prompt_steps=$LONG,updates=$MID veto:horizon=$LONG skd minillm gkd"
    # METHODS picks a subset by name (e.g. METHODS="opd trb skd"); the parameters stay those above
    SELECTED=""
    for m in $ALL; do
      if [[ -z "${METHODS:-}" || " $METHODS " == *" ${m%%:*} "* ]]; then SELECTED="$SELECTED $m"; fi
    done
    # shellcheck disable=SC2086
    $TRB compare "$CONFIG" --out "$OUT/$SETTING/methods" --jobs "$JOBS" $THREADS --seeds $SEEDS --methods $SELECTED
  fi
  if [[ " $PARTS " == *" sweep "* ]]; then
    # OPD and the cell eps0 = 0.02 (the default), horizon = LONG are the method table's runs on the same seeds (linked,
    # not rerun; the targets are made first, as a dangling link would stop trb compare)
    mkdir -p "$OUT/$SETTING/sweep/runs" "$OUT/$SETTING/methods/runs/opd" "$OUT/$SETTING/methods/runs/trb_horizon-$LONG"
    ln -sfn ../../methods/runs/opd "$OUT/$SETTING/sweep/runs/opd"
    ln -sfn "../../methods/runs/trb_horizon-$LONG" "$OUT/$SETTING/sweep/runs/trb_eps0-0.02_horizon-$LONG"
    # shellcheck disable=SC2086
    $TRB compare "$CONFIG" --out "$OUT/$SETTING/sweep" --jobs "$JOBS" $THREADS --seeds $SWEEP_SEEDS --methods \
      opd "trb:eps0=0.001|0.005|0.01|0.02|0.05,horizon=$HORIZONS"
  fi
  if [[ " $PARTS " == *" probe "* ]]; then
    $TRB probe --student "trb:miniature/$SETTING/student" --teacher "trb:miniature/$SETTING/teacher" \
      --data "$SETTING" --eps 0.02 --out "$OUT/$SETTING/probe"
  fi
done
