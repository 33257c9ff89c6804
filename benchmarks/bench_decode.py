"""Lock-step TRB decoding one step at a time, at a fixed context length: the student's and the teacher's
single-token decode steps (`PagedDecoder`, every row holding `--cache-len` filled slots), the beta solve + sample
(eager and compiled), and the engine's whole lock-step step.

    python benchmarks/bench_decode.py                                   # CPU: tiny models
    python benchmarks/bench_decode.py --device cuda --models qwen3      # GPU: Qwen3-1.7B / Qwen3-8B shapes, random init

A step's time is the wall time of `--steps` consecutive steps (no synchronization between them, as in a rollout)
divided by their number. The engine's step is measured by difference: a rollout of N2 tokens minus one of N1
tokens, over N2 - N1, so prefill and compilation cancel. Random-init models almost never emit EOS, so every row
decodes every step. The last stdout line is JSON with the device name.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollout import build_models  # noqa: E402
from common import device_name, emit, synchronize  # noqa: E402

from trb.rollout import Draws, PagedDecoder, TRBPolicy, generate  # noqa: E402


def per_step_ms(step, device, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3 / steps


def model_step_ms(model, space, batch: int, context: int, device, steps: int) -> float:
    """One model's single-token decode step (forward + log-probs on the shared vocabulary) with `context` filled
    slots per row."""
    decoder = PagedDecoder(model, space)
    prompts = torch.randint(2, min(space.size, 30_000), (batch, context), generator=torch.Generator().manual_seed(0))
    decoder.add(prompts.tolist())
    token = prompts[:, -1:].to(device)  # (b, 1)

    def step():
        decoder.step(token)
        decoder.truncate(torch.ones(batch, dtype=torch.long))  # the same context every time

    return per_step_ms(step, device, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", choices=["tiny", "qwen3"], default="tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--cache-len", type=int, default=1024, help="filled KV slots per row (context length)")
    parser.add_argument("--eps", type=float, default=0.02)
    parser.add_argument("--steps", type=int, default=20, help="consecutive steps timed per component")
    parser.add_argument("--engine-tokens", type=int, nargs=2, default=[16, 80], metavar=("N1", "N2"),
                        help="rollout lengths whose difference times the engine's fast lock-step step")
    parser.add_argument("--eager-engine-tokens", type=int, nargs=2, default=[4, 20], metavar=("N1", "N2"))
    parser.add_argument("--skip-eager", action="store_true", help="time only the compiled policy math")
    args = parser.parse_args()
    device = torch.device(args.device)
    student, teacher, space = build_models(args.models, device)
    prompt_gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, min(space.size, 30_000), (args.batch, args.prompt_tokens), generator=prompt_gen).tolist()
    fast = "compiled"
    result = {"benchmark": "decode", "device": device_name(device), "torch": torch.__version__, "models": args.models,
              "batch": args.batch, "cache_len": args.cache_len, "eps": args.eps, "fast": fast, "ms": {}}
    ms = result["ms"]

    def record(name, value):
        ms[name] = round(value, 3)
        print(f"{name}: {value:.3f} ms", file=sys.stderr, flush=True)

    with torch.no_grad():
        for role, model in (("student", student), ("teacher", teacher)):
            record(f"{role}_step", model_step_ms(model, space, args.batch, args.cache_len, device, args.steps))

        # beta solve + blend + sample on (batch, V) log-probs with hard rows (peaked, disagreeing)
        g = torch.Generator(device=device).manual_seed(0)
        s_logp = torch.log_softmax(torch.randn(args.batch, space.size, device=device, generator=g) * 3, -1)
        t_logp = torch.log_softmax(torch.randn(args.batch, space.size, device=device, generator=g) * 3, -1)
        policy = TRBPolicy(args.eps)
        keys = torch.arange(args.batch, device=device)
        draws = lambda: Draws(keys, torch.zeros_like(keys))  # noqa: E731
        compiled_choose = torch.compile(policy.choose, dynamic=False)
        record("solve_sample_compiled", per_step_ms(lambda: compiled_choose(s_logp, t_logp, draws()), device,
                                                    args.steps, warmup=3))
        if not args.skip_eager:
            record("solve_sample_eager", per_step_ms(lambda: policy.choose(s_logp, t_logp, draws()), device,
                                                     args.steps))
        choice = compiled_choose(s_logp, t_logp, draws())
        result["max_realized_kl"] = choice.kl.max().item()

        def rollout_ms(tokens: int, compile: bool) -> float:
            synchronize(device)
            start = time.perf_counter()
            out = generate(policy, prompts, space, tokens, torch.Generator(device=device).manual_seed(1),
                           student=student, teacher=teacher, compile=compile)
            synchronize(device)
            assert int(out.completion_mask.sum(1).min()) == tokens, "a random-init row stopped early"
            return (time.perf_counter() - start) * 1e3

        for name, compile, (n1, n2) in (("lockstep_step_" + fast, True, args.engine_tokens),
                                        ("lockstep_step_eager", False, args.eager_engine_tokens)):
            if args.skip_eager and not compile:
                continue
            rollout_ms(n1, compile)  # warm-up: compiles the policy math
            t1, t2 = rollout_ms(n1, compile), rollout_ms(n2, compile)
            record(name, (t2 - t1) / (n2 - n1))
            ms[name.replace("_step_", "_rollout_ms_") + f"_{n2}_tokens"] = round(t2, 1)
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    emit(result)


if __name__ == "__main__":
    main()
