#!/usr/bin/env bash
# The own-data path of README "Your own data", timed: a GSM8K-format data set (20,000 train / 500 test problems,
# written by studies/word_gsm8k.py), then prepare -> eval of the pair -> train (TRB, 60 steps) -> eval of the result.
#   studies/own_data.sh [OUT]        (default OUT: runs/own_data; PYTHON=... picks the interpreter)
# Each step's wall time goes to OUT/times.txt, its output to OUT/<step>.json and its log to OUT/<step>.log.
set -euo pipefail
OUT=${1:-runs/own_data}
PY=${PYTHON:-python}
mkdir -p "$OUT"
: > "$OUT/times.txt"

step() {  # step NAME COMMAND...: run, log, time
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*" | tee -a "$OUT/times.txt"
  "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  echo "$name: $((SECONDS - start)) s" | tee -a "$OUT/times.txt"
}

step data "$PY" studies/word_gsm8k.py "$OUT/data" --train 20000 --test 500
step prepare "$PY" -m trb prepare "$OUT/data/train.jsonl" --out "$OUT/pair" --teacher-steps 500 --student-steps 400 \
    --threads 2
step eval_teacher "$PY" -m trb eval --model "$OUT/pair/teacher" --data "$OUT/data/test.jsonl" --all --max-new-tokens 96
step eval_student "$PY" -m trb eval --model "$OUT/pair/student" --teacher "$OUT/pair/teacher" \
    --data "$OUT/data/test.jsonl" --all --max-new-tokens 96
step train "$PY" -m trb train trb:configs/miniature_word.yaml models.student="$OUT/pair/student" \
    models.teacher="$OUT/pair/teacher" data.source="$OUT/data/train.jsonl" data.test_source="$OUT/data/test.jsonl" \
    out_dir="$OUT/trb"
step eval_trained "$PY" -m trb eval --model "$OUT/trb" --teacher "$OUT/pair/teacher" --data "$OUT/data/test.jsonl" \
    --all --max-new-tokens 96
