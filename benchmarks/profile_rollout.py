"""The operators one rollout spends its CPU time in: `torch.profiler` over one rollout of the tiny miniature (the models
of `bench_rollout.py`), after a warm-up, as `compare_rollout_engines.py` runs it (every row decodes all its new
tokens, 32 prompt tokens, eps 0.02, 1 thread).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/profile_rollout.py --policy student --batch 64 --new-tokens 64

Prints the profiler's table, operators by self CPU time.
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench_rollout import build_models  # noqa: E402

from trb.models import VocabSpace  # noqa: E402
from trb.rollout import StudentPolicy, TRBPolicy, generate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", choices=["student", "trb"], default="student")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, default=25, help="operators listed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    student, teacher, space = build_models("tiny", torch.device("cpu"))
    space = VocabSpace(size=space.size - 1, stop_ids=(space.size - 1,), eos_id=space.size - 1, pad_id=space.pad_id)
    prompts = torch.randint(2, space.size, (args.batch, 32), generator=torch.Generator().manual_seed(args.batch))
    policy = StudentPolicy() if args.policy == "student" else TRBPolicy(0.02)

    def run():
        generate(policy, prompts.tolist(), space, args.new_tokens, torch.Generator().manual_seed(0), student=student,
                 teacher=teacher, record_kl=False)

    run()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
