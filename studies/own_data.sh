#!/usr/bin/env bash
# The own-data recipe of README "Your own data" (docs/own-data.md), timed: a GSM8K-format data set (20,000 train /
# 500 test problems, written by studies/word_gsm8k.py), then the recipe's commands as shown (1. prepare, 2. eval of
# the pair, 3. train (TRB, 60 steps), 4. eval of the result, 5. compare OPD and TRB on 3 seeds), and the same training
# from the shipped word pair (a teacher trained for the preset's full budget). Run it on a quiet machine: the figures
# are wall times.
#   studies/own_data.sh [OUT] [DEST]   (defaults: runs/own_data, results/own_data; PYTHON=... picks the interpreter)
# Each step's stdout goes to OUT/<step>.stdout, its log to OUT/<step>.log and its wall time (s) to OUT/<step>.time; a
# step whose output and time exist is not run again. At the end the small outputs are copied to DEST: times.txt (each
# step's wall time and the torch threads it chose), machine.txt (processor, cores, torch, load average before and
# after), each command's JSON, prepare.json, the runs' reports, learning curves and compact records, compare's tables.
# A check that the script works, in minutes rather than an hour (its times are not the recipe's):
#   TRAIN=600 TEST=40 TEACHER_STEPS=20 STUDENT_STEPS=20 RUN_ARGS="steps=2 eval_every=2 data.num_test=20" \
#     SEEDS="0 1" studies/own_data.sh /tmp/own_data_check /tmp/own_data_check/results
set -euo pipefail
OUT=${1:-runs/own_data}
DEST=${2:-results/own_data}
PY=${PYTHON:-python}
TRAIN=${TRAIN:-20000}
TEST=${TEST:-500}
TEACHER_STEPS=${TEACHER_STEPS:-500}
STUDENT_STEPS=${STUDENT_STEPS:-400}
SEEDS=${SEEDS:-0 1 2}
RUN_ARGS=${RUN_ARGS:-}  # key=value overrides appended to train and compare (the check's small budget)
mkdir -p "$OUT"
MACHINE="$OUT/machine.txt"
if [[ ! -s "$MACHINE" ]]; then
  {
    echo "processor: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //')"
    echo "cores: $(nproc)"
    echo "torch: $("$PY" -c 'import torch; print(torch.__version__)')"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "started: $(date -u +%FT%TZ), load average $(cut -d' ' -f1-3 /proc/loadavg)"
  } > "$MACHINE"
fi

step() {  # step NAME COMMAND...: run, log, time (skipped when done)
  local name=$1; shift
  if [[ -s "$OUT/$name.stdout" && -s "$OUT/$name.time" ]]; then
    echo "== $name: done in an earlier run ($(cat "$OUT/$name.time") s)"
    return
  fi
  local start=$SECONDS
  echo "== $name: $*"
  "$@" > "$OUT/$name.stdout" 2> "$OUT/$name.log"
  echo $((SECONDS - start)) > "$OUT/$name.time"
  echo "$name: $(cat "$OUT/$name.time") s"
}

DATA="$OUT/data"
PAIR="models.student=$OUT/pair/student models.teacher=$OUT/pair/teacher"
SHIPPED="models.student=trb:miniature/word/student models.teacher=trb:miniature/word/teacher"
FILES="data.source=$DATA/train.jsonl data.test_source=$DATA/test.jsonl"
step data "$PY" studies/word_gsm8k.py "$DATA" --train "$TRAIN" --test "$TEST"
# 1. a tokenizer, a teacher and an under-confident base student
step prepare "$PY" -m trb prepare "$DATA/train.jsonl" --out "$OUT/pair" --teacher-steps "$TEACHER_STEPS" \
    --student-steps "$STUDENT_STEPS"
# 2. the pair on the test file
step eval_teacher "$PY" -m trb eval --model "$OUT/pair/teacher" --data "$DATA/test.jsonl" --all --max-new-tokens 96
step eval_student "$PY" -m trb eval --model "$OUT/pair/student" --teacher "$OUT/pair/teacher" \
    --data "$DATA/test.jsonl" --all --max-new-tokens 96
# 3. distill (TRB, 60 steps); 4. the result on the test file
# shellcheck disable=SC2086
step train "$PY" -m trb train trb:configs/miniature_word.yaml $PAIR $FILES max_new_tokens=96 out_dir="$OUT/trb" \
    $RUN_ARGS
step eval_trained "$PY" -m trb eval --model "$OUT/trb" --teacher "$OUT/pair/teacher" --data "$DATA/test.jsonl" \
    --all --max-new-tokens 96
# 5. OPD against TRB on the same seeds, two runs at a time
# shellcheck disable=SC2086
step compare "$PY" -m trb compare trb:configs/miniature_word.yaml --methods opd trb --seeds $SEEDS --jobs 2 \
    --out "$OUT/cmp" $PAIR $FILES max_new_tokens=96 $RUN_ARGS
# the same training from the shipped word pair
step eval_shipped_teacher "$PY" -m trb eval --model trb:miniature/word/teacher --data "$DATA/test.jsonl" --all \
    --max-new-tokens 96
# shellcheck disable=SC2086
step train_shipped "$PY" -m trb train trb:configs/miniature_word.yaml $SHIPPED $FILES max_new_tokens=96 \
    out_dir="$OUT/trb_shipped" $RUN_ARGS
step eval_trained_shipped "$PY" -m trb eval --model "$OUT/trb_shipped" --teacher trb:miniature/word/teacher \
    --data "$DATA/test.jsonl" --all --max-new-tokens 96
grep -q '^finished:' "$MACHINE" || echo "finished: $(date -u +%FT%TZ), load average $(cut -d' ' -f1-3 /proc/loadavg)" \
    >> "$MACHINE"

mkdir -p "$DEST"
STEPS="data prepare eval_teacher eval_student train eval_trained compare eval_shipped_teacher train_shipped
  eval_trained_shipped"
for name in $STEPS; do
  threads=$(grep -m1 -oE 'torch threads: .*|[0-9]+ torch thread\(s\)' "$OUT/$name.log" || true)
  echo "$name: $(cat "$OUT/$name.time") s${threads:+ ($threads)}"
done > "$DEST/times.txt"
cp "$MACHINE" "$DEST/machine.txt"
for name in $STEPS; do
  [[ $name == compare ]] || cp "$OUT/$name.stdout" "$DEST/$name.json"
done
cp "$OUT/pair/prepare.json" "$DEST/pair_prepare.json"
for run in trb trb_shipped; do
  mkdir -p "$DEST/$run"
  cp "$OUT/$run/report.md" "$OUT/$run/learning_curves.png" "$OUT/$run"/record/* "$DEST/$run/"
done
mkdir -p "$DEST/compare"
cp "$OUT/cmp"/results.md "$OUT/cmp"/results.csv "$OUT/cmp"/*.png "$DEST/compare/"
echo "$DEST: $(find "$DEST" -type f | wc -l) files"
