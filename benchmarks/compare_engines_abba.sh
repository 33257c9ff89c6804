#!/bin/bash
# ABBA comparison of two engines' rollouts on the tiny miniature (benchmarks/compare_rollout_engines.py), each run in
# its own process, with the machine's load average before every run:
#   benchmarks/compare_engines_abba.sh /tmp/previous $PWD CYCLES [batch ...]
# env: NEW_TOKENS, REPEATS, POLICIES, COMPILE as compare_rollout_engines.py reads them; PYTHON (default python).
set -euo pipefail
previous=$1 current=$2 cycles=$3
shift 3
here=$(cd "$(dirname "$0")" && pwd)
for cycle in $(seq "$cycles"); do
    for tree in "$previous" "$current" "$current" "$previous"; do
        name=$([ "$tree" = "$previous" ] && echo previous || echo current)
        echo "$(date +%T) $name load=$(cut -d' ' -f1-3 /proc/loadavg) $(OMP_NUM_THREADS=1 PYTHONPATH=$tree/src \
            ${PYTHON:-python} "$here/compare_rollout_engines.py" "$tree" "$@")"
    done
done
