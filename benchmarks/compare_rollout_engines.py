"""Process CPU time and wall time of rollouts (student only, lock-step TRB, speculative TRB) on the tiny miniature,
for the code of one source tree; run it once per tree, alternating trees (ABBA), to compare two engines on a shared
machine.

    git worktree add /tmp/previous ada57b9   # the engine before the rebuild (fixed batches, dense caches)
    for tree in /tmp/previous $PWD $PWD /tmp/previous /tmp/previous $PWD; do
        OMP_NUM_THREADS=1 PYTHONPATH=$tree/src python benchmarks/compare_rollout_engines.py $tree 16 64
    done

Prints one JSON line: per policy and batch, [CPU ms minimum, CPU ms median, wall ms minimum, wall ms median] over
REPEATS runs (default 3) after a warm-up. CPU time of the process moves less than wall time when other work shares
the cores. 32 prompt tokens, NEW_TOKENS new tokens (default 64), eps 0.02, draft length 4, 1 thread; POLICIES
(default "student trb spec") picks the policies; COMPILE=1 passes compile=True (the trees' compiled decoding). Both
engines decode every sequence of a call at once (no KV budget), so they decode the same batch shapes, and neither
records KL(pi_S || pi_T) and H(pi_T) per token (the earlier engine had no such records; the training loop asks for
them only for losses that reuse recorded teacher log-probs).

Every row decodes NEW_TOKENS tokens: the token space leaves out the models' last id (V = 511) and takes it as the stop
id, which is then never drawn. With the models' own stop id the two engines, which draw different tokens (a generator
against keyed hashes), end different rows at different steps and so do different amounts of work (at batch 16 and
64 new tokens 930 tokens against 1,007 for student rollouts); STOPS=1 keeps it.
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, sys.argv[1] + "/benchmarks")
import torch  # noqa: E402
from bench_rollout import build_models  # noqa: E402

from trb.models import VocabSpace  # noqa: E402

from trb.rollout import StudentPolicy, TRBPolicy, generate  # noqa: E402

try:  # the engine before the rebuild: speculative TRB was a function of its own
    from trb.rollout.speculative import generate_speculative  # noqa: E402
except ImportError:
    generate_speculative = None

torch.set_num_threads(1)
repeats = int(os.environ.get("REPEATS", 3))
new_tokens = int(os.environ.get("NEW_TOKENS", 64))
compile_ = os.environ.get("COMPILE") == "1"
policies = os.environ.get("POLICIES", "student trb spec").split()
student, teacher, space = build_models("tiny", torch.device("cpu"))
if os.environ.get("STOPS") != "1":  # no row stops early: both engines decode batch x NEW_TOKENS tokens
    space = VocabSpace(size=space.size - 1, stop_ids=(space.size - 1,), eos_id=space.size - 1, pad_id=space.pad_id)


def run(name: str, prompts: list[list[int]]) -> None:
    generator = torch.Generator().manual_seed(0)
    policy = StudentPolicy() if name == "student" else TRBPolicy(0.02)
    if generate_speculative is not None and name == "spec":
        generate_speculative(0.02, prompts, space, new_tokens, generator, student, teacher, gamma=4, compile=compile_)
    elif generate_speculative is not None:
        generate(policy, prompts, space, new_tokens, generator, student=student, teacher=teacher, compile=compile_)
    else:  # the training loop's setting: no KL(pi_S || pi_T), H(pi_T) records (the earlier engine had none)
        generate(policy, prompts, space, new_tokens, generator, student=student, teacher=teacher, compile=compile_,
                 gamma=4 if name == "spec" else 0, record_kl=False)


out = {}
for batch in [int(b) for b in sys.argv[2:]] or [16, 64]:
    prompts = torch.randint(2, space.size, (batch, 32), generator=torch.Generator().manual_seed(batch)).tolist()
    for name in policies:
        run(name, prompts)  # warm-up
        wall, cpu = [], []
        for _ in range(repeats):
            started, used = time.perf_counter(), time.process_time()
            run(name, prompts)
            wall.append((time.perf_counter() - started) * 1e3)
            cpu.append((time.process_time() - used) * 1e3)
        out[f"{name}_b{batch}"] = [round(min(cpu), 1), round(statistics.median(cpu), 1), round(min(wall), 1),
                                   round(statistics.median(wall), 1)]
print(json.dumps(out))
