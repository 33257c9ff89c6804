#!/usr/bin/env bash
# Copy a study's tables, CSVs, plots and per-run metric logs and evaluations (no checkpoints, no rollout logs) into
# the repository.
#
#   studies/collect.sh [OUT] [DEST]      (defaults: runs/study results/miniature)
set -euo pipefail
OUT=${1:-runs/study}
DEST=${2:-results/miniature}
cd "$OUT"
find . \( -name '*.md' -o -name 'results.csv' -o -name '*.png' -o -name '*.json' -o -name 'metrics.jsonl' \
  -o -name 'config.yaml' \) -not -path '*/checkpoints/*' -not -path '*/tb/*' -not -path '*/rollouts/*' -print0 |
  while IFS= read -r -d '' file; do
    mkdir -p "$OLDPWD/$DEST/$(dirname "$file")"
    cp "$file" "$OLDPWD/$DEST/$file"
  done
echo "copied into $DEST: $(find "$OLDPWD/$DEST" -type f | wc -l) files, $(du -sh "$OLDPWD/$DEST" | cut -f1)"
