#!/usr/bin/env bash
# The own-data path of README "Your own data", timed: a GSM8K-format data set (20,000 train / 500 test problems,
# written by studies/word_gsm8k.py), then prepare -> eval of the pair -> train (TRB, 60 steps) -> eval of the result,
# and the same training from the shipped word pair (a teacher trained for the preset's full budget).
#   studies/own_data.sh [OUT] [DEST]   (defaults: runs/own_data, results/own_data; PYTHON=... picks the interpreter)
# Each step's output goes to OUT/<step>.json, its log to OUT/<step>.log and its wall time (s) to OUT/<step>.time; a
# step whose output and time exist is not run again. At the end the small outputs (times, JSON results, prepare.json,
# each run's report, learning curves and compact record) are copied to DEST, the figures' raw data in the repository.
set -euo pipefail
OUT=${1:-runs/own_data}
DEST=${2:-results/own_data}
PY=${PYTHON:-python}
mkdir -p "$OUT"

step() {  # step NAME COMMAND...: run, log, time (skipped when done)
  local name=$1; shift
  if [[ -s "$OUT/$name.json" && -s "$OUT/$name.time" ]]; then
    echo "== $name: done in an earlier run ($(cat "$OUT/$name.time") s)"
    return
  fi
  local start=$SECONDS
  echo "== $name: $*"
  "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  echo $((SECONDS - start)) > "$OUT/$name.time"
  echo "$name: $(cat "$OUT/$name.time") s"
}

DATA="$OUT/data"
step data "$PY" studies/word_gsm8k.py "$DATA" --train 20000 --test 500
step prepare "$PY" -m trb prepare "$DATA/train.jsonl" --out "$OUT/pair" --teacher-steps 500 --student-steps 400 \
    --threads 2
step eval_teacher "$PY" -m trb eval --model "$OUT/pair/teacher" --data "$DATA/test.jsonl" --all --max-new-tokens 96
step eval_student "$PY" -m trb eval --model "$OUT/pair/student" --teacher "$OUT/pair/teacher" \
    --data "$DATA/test.jsonl" --all --max-new-tokens 96
step train "$PY" -m trb train trb:configs/miniature_word.yaml models.student="$OUT/pair/student" \
    models.teacher="$OUT/pair/teacher" data.source="$DATA/train.jsonl" data.test_source="$DATA/test.jsonl" \
    out_dir="$OUT/trb"
step eval_trained "$PY" -m trb eval --model "$OUT/trb" --teacher "$OUT/pair/teacher" --data "$DATA/test.jsonl" \
    --all --max-new-tokens 96
SHIPPED="models.student=trb:miniature/word/student models.teacher=trb:miniature/word/teacher"
step eval_shipped_teacher "$PY" -m trb eval --model trb:miniature/word/teacher --data "$DATA/test.jsonl" --all \
    --max-new-tokens 96
# shellcheck disable=SC2086
step train_shipped "$PY" -m trb train trb:configs/miniature_word.yaml $SHIPPED data.source="$DATA/train.jsonl" \
    data.test_source="$DATA/test.jsonl" out_dir="$OUT/trb_shipped"
step eval_trained_shipped "$PY" -m trb eval --model "$OUT/trb_shipped" --teacher trb:miniature/word/teacher \
    --data "$DATA/test.jsonl" --all --max-new-tokens 96

mkdir -p "$DEST"
for name in data prepare eval_teacher eval_student train eval_trained eval_shipped_teacher train_shipped \
    eval_trained_shipped; do
  echo "$name: $(cat "$OUT/$name.time") s"
done > "$DEST/times.txt"
cp "$OUT"/*.json "$DEST/"
cp "$OUT/pair/prepare.json" "$DEST/pair_prepare.json"
for run in trb trb_shipped; do
  mkdir -p "$DEST/$run"
  cp "$OUT/$run/report.md" "$OUT/$run/learning_curves.png" "$OUT/$run"/record/* "$DEST/$run/"
done
echo "$DEST: $(find "$DEST" -type f | wc -l) files"
