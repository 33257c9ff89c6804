"""CPU time of `generate` (student only, lock-step TRB) and `generate_speculative` on the tiny miniature, for the
code of one source tree; run it once per tree, alternating trees, to compare two engines on a shared machine.

    git worktree add /tmp/previous ada57b9   # the previous engine (fixed batches, dense caches)
    for tree in /tmp/previous $PWD /tmp/previous $PWD; do
        OMP_NUM_THREADS=1 PYTHONPATH=$tree/src python benchmarks/compare_rollout_engines.py $tree 1 16 64
    done

Prints one JSON line: per policy and batch, [CPU ms (minimum over repeats), wall ms (median)]. CPU time of the
process moves less than wall time when other work shares the cores. 32 prompt tokens, 64 new tokens, eps 0.02,
draft length 4, 1 thread.
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, sys.argv[1] + "/benchmarks")
import torch  # noqa: E402
from bench_rollout import build_models  # noqa: E402

from trb.rollout import StudentPolicy, TRBPolicy, generate  # noqa: E402
from trb.rollout.speculative import generate_speculative  # noqa: E402

torch.set_num_threads(1)
repeats = int(os.environ.get("REPEATS", 2))
student, teacher, space = build_models("tiny", torch.device("cpu"))
out = {}
for batch in [int(b) for b in sys.argv[2:]] or [1, 16, 64]:
    prompts = torch.randint(2, 512, (batch, 32), generator=torch.Generator().manual_seed(batch)).tolist()
    for name, policy in (("student", StudentPolicy()), ("trb", TRBPolicy(0.02)), ("spec", None)):
        def run():
            generator = torch.Generator().manual_seed(0)
            if policy is None:
                return generate_speculative(0.02, prompts, space, 64, generator, student, teacher, gamma=4)
            return generate(policy, prompts, space, 64, generator, student=student, teacher=teacher)
        run()  # warm-up
        wall, cpu = [], []
        for _ in range(repeats):
            started, used = time.perf_counter(), time.process_time()
            run()
            wall.append((time.perf_counter() - started) * 1e3)
            cpu.append((time.process_time() - used) * 1e3)
        out[f"{name}_b{batch}"] = [round(min(cpu), 1), round(statistics.median(wall), 1)]
print(json.dumps(out))
