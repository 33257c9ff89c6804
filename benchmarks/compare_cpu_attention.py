"""Rollouts with the CPU paged-attention kernel against the same rollouts that gather the KV slots (TRB_CPU_KERNEL=0),
alternating in one process (ABAB, then BABA), so that the machine's drift between processes does not enter the ratio.
The tiny miniature of `bench_rollout.py`, 32 prompt tokens, eps 0.02, 1 thread; every row decodes all its new tokens
(the stop id is left out of the token space, as in `compare_rollout_engines.py`).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/compare_cpu_attention.py [--repeats 4] [--policies student trb]

Prints per policy, batch and new tokens the median process CPU ms of each and their ratio (kernel / gather).
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_rollout import build_models  # noqa: E402

from trb.models import VocabSpace  # noqa: E402
from trb.rollout import StudentPolicy, TRBPolicy, cpu_attention, generate  # noqa: E402

CONFIGS = [(16, 64), (64, 64), (16, 96), (64, 96)]  # (batch, new tokens)


def use_kernel(on: bool) -> None:
    os.environ["TRB_CPU_KERNEL"] = "1" if on else "0"
    cpu_attention.paged_decode_attention.cache_clear()


def rollout_ms(models, policy: str, batch: int, new_tokens: int) -> float:
    student, teacher, space = models
    prompts = torch.randint(2, space.size, (batch, 32), generator=torch.Generator().manual_seed(batch)).tolist()
    behavior = StudentPolicy() if policy == "student" else TRBPolicy(0.02)
    start = time.process_time()
    generate(behavior, prompts, space, new_tokens, torch.Generator().manual_seed(0), student=student, teacher=teacher,
             record_kl=False)
    return (time.process_time() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=4, help="runs of each, alternating")
    parser.add_argument("--policies", nargs="+", choices=["student", "trb"], default=["student", "trb"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    student, teacher, space = build_models("tiny", torch.device("cpu"))
    space = VocabSpace(size=space.size - 1, stop_ids=(space.size - 1,), eos_id=space.size - 1, pad_id=space.pad_id)
    models = (student, teacher, space)
    use_kernel(True)
    if cpu_attention.paged_decode_attention() is None:
        raise SystemExit("the CPU kernel could not be built here")
    for policy in args.policies:
        for batch, new_tokens in CONFIGS:
            times: dict[bool, list[float]] = {True: [], False: []}
            rollout_ms(models, policy, batch, new_tokens)  # warm-up
            for repeat in range(args.repeats):
                for on in ((False, True) if repeat % 2 == 0 else (True, False)):
                    use_kernel(on)
                    times[on].append(rollout_ms(models, policy, batch, new_tokens))
            kernel, gather = statistics.median(times[True]), statistics.median(times[False])
            print(f"{policy:7s} batch {batch:3d} new tokens {new_tokens:3d}: gather {gather:7.0f} ms, kernel {kernel:7.0f} ms,"
                  f" kernel / gather {kernel / gather:.3f}", flush=True)


if __name__ == "__main__":
    main()
