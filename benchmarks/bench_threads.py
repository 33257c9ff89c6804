"""CPU threads on a busy machine: one `trb train` step of the word miniature (TRB rollouts of 8 prompts x 4, 64 new
tokens, the reverse-KL loss and its backward, an AdamW step) timed in fresh processes under each setting of torch's
intra-op threads (OMP_NUM_THREADS) and OpenMP's wait policy (OMP_WAIT_POLICY: unset = libgomp's default, PASSIVE =
idle threads sleep, ACTIVE = idle threads spin), the settings interleaved A B ... B A so that a change of the
machine's load hits each alike.

    python benchmarks/bench_threads.py                       # the machine as it is (say how busy: the load average)
    python benchmarks/bench_threads.py --load 2              # plus 2 busy-looping processes: a busy machine, made

Each setting's wall time and process CPU time per step are medians over its processes; CPU / wall above the thread
count means threads that waited by spinning. The last stdout line is JSON with the device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


SETTINGS = {  # name -> environment
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "all cores": {"OMP_NUM_THREADS": "{cores}"},
    "all cores, passive": {"OMP_NUM_THREADS": "{cores}", "OMP_WAIT_POLICY": "PASSIVE"},
    "all cores, active": {"OMP_NUM_THREADS": "{cores}", "OMP_WAIT_POLICY": "ACTIVE"},
}


def cpu_model() -> str:
    """The processor's name as /proc/cpuinfo gives it (platform.processor() is often just the architecture)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())


def child(steps: int) -> None:
    """Time `steps` training steps after a warm-up step; print [(wall_s, cpu_s), ...] as JSON."""
    import torch

    import trb
    from trb.tasks import SETTINGS as PROBLEMS

    pair = trb.load_pair("trb:miniature/word/student", "trb:miniature/word/teacher")
    questions = [p.question for p in PROBLEMS["word"]("test", 8, 0) for _ in range(4)]
    optimizer = torch.optim.AdamW(pair.student.parameters(), lr=1e-5)
    times = []
    for step in range(steps + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        pair.student.eval()
        rollout = trb.sample_rollouts(pair, trb.TRBPolicy(eps=0.02), questions, 64, torch.Generator().manual_seed(step))
        pair.student.train()
        weight = rollout.completion_mask.float() / rollout.completion_mask.sum()  # (B, T)
        loss, _, _ = trb.distill_loss(pair.student, pair.teacher, rollout, pair.vocab, trb.LossSpec(), weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step > 0:
            times.append((time.perf_counter() - wall, time.process_time() - cpu))
    print(json.dumps(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="A B ... B A rounds (each runs every setting twice)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process (after a warm-up step)")
    parser.add_argument("--load", type=int, default=0, help="busy-looping processes to start beside the benchmark")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.steps)
    cores = len(os.sched_getaffinity(0))
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in args.settings}
    load_before = os.getloadavg()[0]
    try:
        for _ in range(args.rounds):
            for name in args.settings + args.settings[::-1]:
                env = {**base, **{k: v.format(cores=cores) for k, v in SETTINGS[name].items()}}
                out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps)], env=env,
                                     capture_output=True, text=True, check=True).stdout
                samples[name] += [tuple(t) for t in json.loads(out.strip().splitlines()[-1])]
                print(f"{name}: {samples[name][-1][0]:.2f} s wall, {samples[name][-1][1]:.2f} s CPU "
                      f"(load average {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    result = {"benchmark": "threads", "device": f"cpu: {cpu_model()}, {cores} cores",
              "load_average_1min_at_start": round(load_before, 2), "added_load": args.load,
              "step": "word miniature, TRB rollouts 8 prompts x 4, 64 new tokens, reverse-KL backward, AdamW"}
    for name, values in samples.items():
        wall, cpu = statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)
        result[name] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "cpu_per_wall": round(cpu / wall, 2),
                        "steps": len(values)}
    for key, value in result.items():
        print(f"{key}: {value}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
