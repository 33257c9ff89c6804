#!/usr/bin/env bash
# The "chain" regime study (trb:configs/miniature_chain.yaml): does TRB pay where early rollouts stay uninformative?
# One command, resumable (rerun it and finished runs are kept):
#
#   studies/regime.sh [OUT]        (default OUT=runs/regime)
#
#   1. pair:       remake the shipped pair (trb:miniature/chain) in PAIR when PAIR is a folder: the arith teacher
#                  trained 400 + 800 more steps on chain problems, a 3-layer student from scratch, then both
#                  evaluated; skipped when PAIR/prepare.json exists. Default PAIR=trb:miniature/chain: the shipped one.
#   2. grid:       TRB eps0 x horizon on GRID_SEEDS, GRID_STEPS (default 200) steps each: every warmup (K <= 100)
#                  has ended by then; the cell with the best validation pass@1 is chosen (never test). OPD and the
#                  paper's cell are part 3's runs (linked: identical configs and seeds), scored on their first
#                  GRID_STEPS steps (`trb compare --until-step`: a run equals the first steps of a longer one)
#   3. main:       vanilla OPD and TRB at the paper's setting (eps0 = 0.02, K = 50) on MAIN_SEEDS (default 10)
#   4. others:     TRB at the chosen cell, SKD, SFT warmup, adaptive TRB on OTHER_SEEDS (default 5), OTHER_STEPS
#                  (default 200, as the grid) steps each, against the same OPD runs as 3 (linked, not rerun, cut
#                  at OTHER_STEPS); the chosen cell's grid runs are its first seeds (linked)
#   5. estimators: OPD and TRB with the paper's top-k estimator and the renormalized top-k KL (k = 16) for
#                  ESTIMATOR_STEPS (default 120) steps, beside part 3's exact full-vocabulary KL runs cut at the same
#                  step (studies/estimators.py makes the table)
#   6. probe:      the continuation probe on step-0 prefixes
#   7. replication: part 3's design on REPLICATION_SEEDS (default 10-19), pre-registered in
#                  studies/chain_replication.md: the confirmatory test reads its table alone
#   8. pooled:     parts 3 and 7 in one comparison (links to their runs; trains nothing)
# Then `studies/collect.sh OUT results/regime` puts the per-run data and tables into the repository.
# Environment: JOBS runs in parallel (default 2), THREADS per run (default cores / JOBS), PARTS (default all).
set -euo pipefail
OUT=${1:-runs/regime}
JOBS=${JOBS:-2}
TRB=${TRB:-trb}
PYTHON=${PYTHON:-python}
MAIN_SEEDS=${MAIN_SEEDS:-0 1 2 3 4 5 6 7 8 9}
OTHER_SEEDS=${OTHER_SEEDS:-0 1 2 3 4}
GRID_SEEDS=${GRID_SEEDS:-0 1 2}
GRID_STEPS=${GRID_STEPS:-200}
OTHER_STEPS=${OTHER_STEPS:-200}
ESTIMATOR_STEPS=${ESTIMATOR_STEPS:-120}
REPLICATION_SEEDS=${REPLICATION_SEEDS:-10 11 12 13 14 15 16 17 18 19}
PARTS=${PARTS:-pair grid main others estimators probe replication pooled}
THREADS=${THREADS:+--threads $THREADS}
CONFIG=trb:configs/miniature_chain.yaml
PAIR=${PAIR:-trb:miniature/chain}
MODELS="models.student=$PAIR/student models.teacher=$PAIR/teacher"
has() { [[ " $PARTS " == *" $1 "* ]]; }
RECORDS=${RECORDS:-$([[ $PAIR == trb:miniature/chain ]] && echo results/regime || echo none)}
# Part 3's runs stand in for the other parts' OPD and paper-cell runs (linked: identical configs and seeds); the link
# targets are made first (a dangling link stops trb compare). Made for the parts that use them, and whenever finished
# runs are restored from RECORDS (which keeps those runs once, behind the same links).
mkdir -p "$OUT/main/runs/opd" "$OUT/main/runs/trb_eps0-0.02_horizon-50"
if has grid || has others || [[ $RECORDS != none ]]; then
  mkdir -p "$OUT/grid/runs" "$OUT/others/runs"
  ln -sfn ../../main/runs/opd "$OUT/grid/runs/opd"
  ln -sfn ../../main/runs/trb_eps0-0.02_horizon-50 "$OUT/grid/runs/trb_eps0-0.02_horizon-50"
  ln -sfn ../../main/runs/opd "$OUT/others/runs/opd"
fi
# A fresh clone resumes from the repository's records: each finished run that studies/collect.sh kept under RECORDS
# (default results/regime, only for the shipped pair) and that OUT lacks is copied into OUT, where it counts as
# finished (trb compare trains only runs with neither a summary.json nor a compact record), with the grid's table
# (part 4 chooses its cell from it). RECORDS=none starts from nothing.
if [[ $RECORDS != none && -d $RECORDS ]]; then
  (cd "$RECORDS" && find . -path '*/runs/*/seed_*/metrics.jsonl.gz' -printf '%h\n' | sort) | while read -r RUN; do
    if [[ ! -e "$OUT/$RUN" ]]; then
      mkdir -p "$OUT/$RUN" && cp "$RECORDS/$RUN/"* "$OUT/$RUN/"
    fi
  done
  if [[ -f "$RECORDS/grid/results.csv" && ! -f "$OUT/grid/results.csv" ]]; then
    cp "$RECORDS/grid/results.csv" "$OUT/grid/results.csv"
  fi
fi

if has pair && [[ ! -f "$PAIR/prepare.json" && $PAIR != trb:* ]]; then
  # The chain teacher starts from the arith teacher (same alphabet and operations, shorter chains): two fine-tuning
  # runs of 400 and 800 steps took 18 min (2 threads) and 60 min (1 thread beside another job), where the preset's
  # 6-layer teacher from scratch would need ~3 h on 2 cores.
  $TRB prepare chain --out "$OUT/teacher_400" --teacher-from trb:miniature/arith/teacher --teacher-more-steps 400 \
    --student-steps 1
  $TRB prepare chain --out "$OUT/teacher_1200" --teacher-from "$OUT/teacher_400/teacher" --teacher-more-steps 800 \
    --student-steps 1
  $TRB prepare chain --out "$OUT/student" --teacher-from "$OUT/teacher_400/teacher"
  $TRB prepare chain --out "$PAIR" --teacher-from "$OUT/teacher_1200/teacher" --student-from "$OUT/student/student"
fi
if has grid; then
  # OPD and the paper's cell (eps0 = 0.02, K = 50) are part 3's runs on the same seeds (linked above, not rerun)
  # shellcheck disable=SC2086
  $TRB compare "$CONFIG" --out "$OUT/grid" --jobs "$JOBS" $THREADS --seeds $GRID_SEEDS --until-step "$GRID_STEPS" \
    --methods opd "trb:eps0=0.005|0.02|0.05,horizon=25|50|100" $MODELS steps="$GRID_STEPS"
fi
if has main; then
  # shellcheck disable=SC2086
  $TRB compare "$CONFIG" --out "$OUT/main" --jobs "$JOBS" $THREADS --seeds $MAIN_SEEDS \
    --methods opd "trb:eps0=0.02,horizon=50" $MODELS
fi
if has others; then
  BEST=$($PYTHON -c 'import sys; from trb.compare import best_by_validation; print(best_by_validation(sys.argv[1], "trb"))' \
    "$OUT/grid/results.csv")
  BEST_SPEC=$(echo "$BEST" | sed -e 's/^trb(/trb:/' -e 's/)$//')
  echo "grid cell chosen on validation: $BEST"
  # OPD: part 3's runs (linked above); finished runs are not trained again
  if [[ $OTHER_STEPS == "$GRID_STEPS" ]]; then  # the chosen cell's finished grid runs have this part's config
    SLUG=$(echo "$BEST" | sed -e 's/(/_/' -e 's/)//' -e 's/,/_/g' -e 's/=/-/g')  # trb.config.Variant.slug
    mkdir -p "$OUT/others/runs/$SLUG"
    for SEED in $OTHER_SEEDS; do
      if [[ ! -e "$OUT/others/runs/$SLUG/seed_$SEED" && ( -f "$OUT/grid/runs/$SLUG/seed_$SEED/summary.json" ||
            -f "$OUT/grid/runs/$SLUG/seed_$SEED/metrics.jsonl.gz" ) ]]; then
        ln -sfn "../../../grid/runs/$SLUG/seed_$SEED" "$OUT/others/runs/$SLUG/seed_$SEED"
      fi
    done
  fi
  # shellcheck disable=SC2086
  $TRB compare "$CONFIG" --out "$OUT/others" --jobs "$JOBS" $THREADS --seeds $OTHER_SEEDS --until-step "$OTHER_STEPS" \
    --methods opd "$BEST_SPEC" skd sft_warmup:prompt_steps=50,updates=25 trb_adaptive $MODELS steps="$OTHER_STEPS"
fi
if has estimators; then
  for DIVERGENCE in topk_student_weighted_kl topk_reverse_kl; do  # the exact KL (the config's) is part 3's runs
    # shellcheck disable=SC2086
    $TRB compare "$CONFIG" --out "$OUT/estimators/$DIVERGENCE" --jobs "$JOBS" $THREADS --seeds $OTHER_SEEDS \
      --methods opd "trb:eps0=0.02,horizon=50" $MODELS loss.divergence=$DIVERGENCE steps="$ESTIMATOR_STEPS"
  done
  "$PYTHON" "$(dirname "$0")/estimators.py" "$OUT" > "$OUT/estimators/estimators.md"
fi
if has probe; then
  $TRB probe --student "$PAIR/student" --teacher "$PAIR/teacher" --data chain --eps 0.02 --max-new-tokens 160 \
    --lengths 0 8 16 32 48 64 96 --out "$OUT/probe"
fi
if has replication; then
  # shellcheck disable=SC2086
  $TRB compare "$CONFIG" --out "$OUT/replication" --jobs "$JOBS" $THREADS --seeds $REPLICATION_SEEDS \
    --methods opd "trb:eps0=0.02,horizon=50" $MODELS
fi
if has pooled; then
  # every finished seed of parts 3 and 7, linked (same configs), in one table: the pooled estimate
  SEEDS=()
  for PART_SEEDS in "main:$MAIN_SEEDS" "replication:$REPLICATION_SEEDS"; do
    for SEED in ${PART_SEEDS#*:}; do
      for VARIANT in opd trb_eps0-0.02_horizon-50; do
        mkdir -p "$OUT/pooled/runs/$VARIANT"
        ln -sfn "../../../${PART_SEEDS%%:*}/runs/$VARIANT/seed_$SEED" "$OUT/pooled/runs/$VARIANT/seed_$SEED"
      done
      SEEDS+=("$SEED")
    done
  done
  $TRB compare "$CONFIG" --out "$OUT/pooled" --jobs "$JOBS" $THREADS --seeds "${SEEDS[@]}" \
    --methods opd "trb:eps0=0.02,horizon=50" $MODELS
fi
