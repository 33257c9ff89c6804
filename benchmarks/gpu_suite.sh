#!/usr/bin/env bash
# Every GPU check in one go, as BENCHMARKS.md reports them: the GPU tests (`pytest -m gpu`), lock-step decode steps,
# core math (beta solve, 8,192-token loss), rollouts (speculative vs lock-step), one training step against TRL. Each benchmark's full output goes
# to OUT_DIR/<name>.txt, a summary to stdout. Run from the repository root on a CUDA machine:
#
#     benchmarks/gpu_suite.sh OUT_DIR
#
# Needs torch with CUDA, transformers, and (for the TRL comparison) trl + datasets importable.
# SMALL=1 runs the same commands on tiny shapes (a CPU check of the script itself: DEVICE=cpu SMALL=1).
set -u
out=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
if [ "${SMALL:-0}" = 1 ]; then
    core_shape="--tokens 256 --d-student 64 --d-teacher 96 --vocab 5000 --batch 4 --chunks 64 128 --repeats 2"
    models=tiny decode_shape="--batch 4 --cache-len 128 --steps 4 --engine-tokens 4 12 --eager-engine-tokens 4 8"
    rollout_shape="--batch-sizes 4 --new-tokens 16" scale=0.05 train_shape="--prompts 4 --new-tokens 8 --steps 1"
    realistic_shape="--models tiny --sequences 16 --concurrency 4 --cap 32"
    vllm_shape="--models qwen3-scaled --batch 8 --new-tokens 32 --lengths traces --rollout-batch 4 --repeats 1" vllm_scale=0.125 vllm_tokens=8 vllm_steps=2
    vllm_args="rollout.kv_cache_bytes=268435456 rollout.enforce_eager=true rollout.dtype=float32"
else
    core_shape="--tokens 8192 --d-student 2048 --d-teacher 4096 --chunks 1024 2048 --repeats 5"
    models=qwen3 decode_shape="--batch 64 --cache-len 1024"
    rollout_shape="--batch-sizes 16 --new-tokens 128" scale=0.25 train_shape="--prompts 64 --new-tokens 128 --steps 3"
    realistic_shape="--models qwen3-0.6b-4b --sequences 256 --concurrency 64 --cap 1024"
    vllm_shape="--models qwen3-0.6b-4b --dtype bfloat16 --batch 64 --new-tokens 7168 --lengths traces --rollout-batch 16 --kv-cache-mib 16384 --repeats 1"
    vllm_scale=1 vllm_tokens=1024 vllm_steps=4 vllm_args="rollout.gpu_memory_utilization=0.3"
fi

# a subset, e.g. STAGES="decode core"; vllm_decode and vllm_step (below) only when named
stages=${STAGES:-tests decode core rollout realistic train_step}

run() {  # run NAME SECONDS CMD...: appends CMD's output to OUT_DIR/NAME.txt, prints its last line
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    case " $stages " in *" $name "*) ;; *) return ;; esac
    echo "\$ $*" >>"$out/$name.txt"
    timeout "$limit" "$@" >>"$out/$name.txt" 2>&1
    local rc=$?
    echo "== $name rc=$rc $((SECONDS - start))s: $*"
    tail -n 1 "$out/$name.txt" | cut -c1-1500
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    $py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    $py -c "import trl, datasets; print('trl', trl.__version__, 'datasets', datasets.__version__)"
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

run tests "${TESTS_S:-120}" $py -m pytest -q -m gpu -p no:cacheprovider tests
# shellcheck disable=SC2086  # the shapes are word lists
run decode "${DECODE_S:-170}" $py benchmarks/bench_decode.py --device "$device" --models $models $decode_shape \
    ${DECODE_ARGS:-}
# shellcheck disable=SC2086
run core "${CORE_S:-170}" $py benchmarks/bench_core.py --device "$device" $core_shape --dtype bf16 --compile \
    ${CORE_ARGS:-}
# shellcheck disable=SC2086
run rollout "${ROLLOUT_S:-110}" $py benchmarks/bench_rollout.py --device "$device" --models $models $rollout_shape \
    --compile --repeats 2
# A step's rollouts with reasoning-trace lengths (log-normal, mean ~cap / 4, tail to the cap) through continuous
# batching at full Qwen3-0.6B / 4B size: tokens/s, decode steps over the ideal, KV reads over filled slots. Not yet
# run on a GPU: the limit is an estimate (about 1,500 lock-step steps for each of two policies, plus model set-up).
# shellcheck disable=SC2086
run realistic "${REALISTIC_S:-240}" $py benchmarks/bench_rollout.py --device "$device" --workload realistic \
    $realistic_shape
case " $stages " in *" train_step "*)
    $py -c "from pathlib import Path; from trb.testing import random_qwen3_pair as p; p(Path('/tmp/trb-random'), \
'0.6b', '1.7b', scale=$scale)" >>"$out/train_step.txt" 2>&1 ;;
esac
# shellcheck disable=SC2086
run train_step "${TRAIN_S:-120}" $py benchmarks/bench_train_step.py --device "$device" $train_shape --compile \
    --student /tmp/trb-random/student --teacher /tmp/trb-random/teacher

# Rollouts on vLLM beside trb's own engine: needs vLLM importable (`pip install 'trb[vllm]'`, its CUDA build); not in
# the default stages and never run by this project, whose GPU machine has no vLLM. vllm_decode: student-only and TRB
# rollouts of 64 sequences at full Qwen3-0.6B / 4B size with lengths drawn like reasoning traces up to the recipe's
# cap of 7,168 tokens (`--lengths traces`), decode ms per step and tokens/s of each engine. vllm_step: whole training
# steps of configs/qwen3_0.6b_from_4b.yaml with rollout.engine=trb and =vllm on random-init models (which never stop
# before the cap: every sequence decodes vllm_tokens, the cap's worst case, as the training loop has no length script)
# and GSM8K prompts. The limits are guesses.
# shellcheck disable=SC2086
run vllm_decode "${VLLM_DECODE_S:-1800}" $py benchmarks/bench_vllm.py --device "$device" $vllm_shape
case " $stages " in *" vllm_step "*)
    $py -c "from pathlib import Path; from trb.testing import random_qwen3_pair as p; \
p(Path('/tmp/trb-random-vllm'), '0.6b', '4b', scale=$vllm_scale)" >>"$out/vllm_step.txt" 2>&1 ;;
esac
# shellcheck disable=SC2086
run vllm_step "${VLLM_STEP_S:-900}" $py benchmarks/bench_engine_step.py configs/qwen3_0.6b_from_4b.yaml \
    "$out/vllm_step" models.student=/tmp/trb-random-vllm/student models.teacher=/tmp/trb-random-vllm/teacher \
    device="$device" data.source=tests/data/gsm8k/test.jsonl data.num_train=512 data.num_test=8 eval_every=0 \
    eval_samples=1 checkpoint_every=0 steps=$vllm_steps prompts_per_step=16 rollouts_per_prompt=4 \
    max_new_tokens=$vllm_tokens $vllm_args
