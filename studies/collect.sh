#!/usr/bin/env bash
# The study's per-run data into the repository, then every table and plot rebuilt from the repository's copy alone.
#
#   studies/collect.sh [OUT] [DEST]      (defaults: runs/study results/miniature)
#
# 1. When OUT exists: each comparison's plan.json (trb compare), each run's compact record (runs/<variant>/seed_<s>/
#    record/: metrics.jsonl.gz, evals.csv.gz, config.yaml) and each probe's probe.json are copied
#    to the same place under DEST (no checkpoints, no rollout logs, no TensorBoard files); a run folder that is
#    itself a compact record (a finished run restored from DEST by studies/regime.sh) is copied as it is. Runs that
#    two parts of a study share (a relative link within OUT) stay links in DEST, so each run is kept once.
# 2. Every folder under DEST holding a plan.json or probe.json gets its tables and plots rebuilt from those files
#    (`trb tables`): deleting results.md, results.csv and the plots and running this script again gives them back
#    identically. A study still running gets tables from the seeds every variant has finished, and their title says
#    how many of the planned seeds that is (`trb tables --finished-seeds`); a part with no such seed yet is skipped.
#    Each comparison also gets paired_curves.md (studies/paired_curves.py: test pass@1 at every evaluation, paired
#    differences), and the chain study its estimator table (studies/estimators.py -> estimators/estimators.md).
set -euo pipefail
OUT=${1:-runs/study}
DEST=${2:-results/miniature}
TRB=${TRB:-trb}
PYTHON=${PYTHON:-python}
if [[ -d "$OUT" ]]; then
  (cd "$OUT" && find -L . \( -name plan.json -o -name probe.json -o -path '*/record/*' \) -type f -print0) |
    while IFS= read -r -d '' file; do
      target="$DEST/${file/\/record\//\/}"
      mkdir -p "$(dirname "$target")"
      cp "$OUT/$file" "$target"
    done
  # runs that are compact records themselves (studies/regime.sh restores finished runs from DEST this way)
  (cd "$OUT" && find -L . -path '*/runs/*/seed_*/metrics.jsonl.gz' ! -path '*/record/*' -type f -printf '%h\0') |
    while IFS= read -r -d '' run; do
      mkdir -p "$DEST/$run"
      find -L "$OUT/$run" -maxdepth 1 -type f -exec cp {} "$DEST/$run/" \;
    done
  # runs one part of a study shares with another (a relative link within OUT: studies/regime.sh, studies/miniature.sh)
  # stay links in DEST, so the repository holds each run once; a link out of OUT was copied above as a folder
  ROOT=$(readlink -f "$OUT")
  (cd "$OUT" && find . -path '*/runs/*' -type l -print0) |
    while IFS= read -r -d '' link; do
      text=$(readlink "$OUT/$link")
      if [[ $text != /* && $(readlink -f "$OUT/$link") == "$ROOT"/* ]]; then
        rm -rf "${DEST:?}/$link"
        mkdir -p "$(dirname "$DEST/$link")"
        ln -sfn "$text" "$DEST/$link"
        [[ -e "$DEST/$link" ]] || rm "$DEST/$link"  # its target holds no finished run yet
      fi
    done
fi
mapfile -t FOLDERS < <(find "$DEST" \( -name plan.json -o -name probe.json \) -type f -printf '%h\n' | sort)
if [[ ${#FOLDERS[@]} -eq 0 ]]; then
  echo "no plan.json or probe.json under $DEST: nothing to rebuild" >&2
  exit 2
fi
# shellcheck disable=SC2086
$TRB tables --finished-seeds "${FOLDERS[@]}"
for folder in "${FOLDERS[@]}"; do  # each comparison's curves step by step, with paired differences
  if [[ -f "$folder/plan.json" && -f "$folder/results.md" ]]; then  # (no tables yet: no seed finished)
    "$PYTHON" "$(dirname "$0")/paired_curves.py" "$folder" > "$folder/paired_curves.md"
  fi
done
# the chain study's estimator table (studies/regime.sh part 5), once every estimator has a finished seed
if [[ -f "$DEST/estimators/topk_student_weighted_kl/results.md" && -f "$DEST/estimators/topk_reverse_kl/results.md" ]]
then
  "$PYTHON" "$(dirname "$0")/estimators.py" "$DEST" > "$DEST/estimators/estimators.md"
fi
echo "$DEST: $(find "$DEST" -type f | wc -l) files, $(du -sh "$DEST" | cut -f1)"
