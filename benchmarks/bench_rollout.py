"""Rollout throughput: student-only decoding, lock-step TRB decoding (student + teacher + beta solve), exact speculative
TRB (student drafts, one teacher forward per round), and Hugging Face `generate` on the same student, at several
batch sizes.

    python benchmarks/bench_rollout.py                         # CPU: tiny models (miniature-sized)
    python benchmarks/bench_rollout.py --models qwen3 --device cuda --new-tokens 256 --cache static
        # GPU: random-init Qwen3-1.7B-shaped student and Qwen3-8B-shaped teacher, real vocabulary

Tokens/s counts generated completion tokens (all sequences) per second of wall time, after warm-up, synchronized.
The last stdout line is JSON with the device name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit, synchronize, time_ms  # noqa: E402

from trb.models import VocabSpace, tiny_causal_lm  # noqa: E402
from trb.rollout import StudentPolicy, TRBPolicy, engine, generate  # noqa: E402
from trb.rollout.speculative import generate_speculative  # noqa: E402


def build_models(kind: str, device: torch.device):
    if kind == "tiny":
        vocab = 512
        student = tiny_causal_lm(vocab, 128, 4, num_heads=4, num_kv_heads=2, seed=0, init_std=0.1,
                                 tie_word_embeddings=False, eos_token_id=1)
        teacher = tiny_causal_lm(vocab, 256, 6, num_heads=8, num_kv_heads=4, seed=1, init_std=0.1,
                                 tie_word_embeddings=False, eos_token_id=1)
        space = VocabSpace(size=vocab, stop_ids=(1,), eos_id=1, pad_id=0)
    else:
        from trb.testing import random_qwen3

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        student = random_qwen3("1.7b", seed=0, device=device, dtype=dtype)
        teacher = random_qwen3("8b", seed=1, chat=True, device=device, dtype=dtype)
        space = VocabSpace(size=151_669, stop_ids=(151_643, 151_645), eos_id=151_643, pad_id=151_643)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return student.to(device, dtype).eval(), teacher.to(device, dtype).eval(), space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", choices=["tiny", "qwen3"], default="tiny")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--eps", type=float, default=0.02)
    parser.add_argument("--gamma", type=int, default=4, help="draft length of speculative TRB")
    parser.add_argument("--cache", choices=["dynamic", "static"], default="dynamic")
    parser.add_argument("--compile", action="store_true",
                        help="compiled decode steps: with --cache static fixed shapes (CUDA graphs on a GPU), and "
                        "speculative TRB with fixed shapes too; with --cache dynamic the lean single-token step, "
                        "dynamic shapes (a CPU's compiled decoding; speculative TRB stays eager)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    student, teacher, space = build_models(args.models, device)
    rows = []
    for batch in args.batch_sizes:
        prompt_gen = torch.Generator().manual_seed(batch)
        prompts = torch.randint(2, min(space.size, 30_000), (batch, args.prompt_tokens), generator=prompt_gen).tolist()
        counted = {}

        def ours(policy, name):
            def run():
                rollout = generate(policy, prompts, space, args.new_tokens, torch.Generator(device=device).manual_seed(0),
                                   student=student, teacher=teacher, cache=args.cache, compile=args.compile)
                counted[name] = int(rollout.completion_mask.sum())
            return run

        def hf():
            ids = torch.tensor(prompts, device=device)
            out = student.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                   do_sample=True, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=space.pad_id,
                                   eos_token_id=list(space.stop_ids))
            completion = out[:, ids.shape[1]:]
            stopped = torch.isin(completion, torch.tensor(space.stop_ids, device=device))
            ended = (stopped.cumsum(1) - stopped.long()) > 0  # tokens after the first stop are padding
            counted["hf_generate"] = int((~ended).sum())

        def speculative():
            rollout, stats = generate_speculative(args.eps, prompts, space, args.new_tokens,
                                                  torch.Generator(device=device).manual_seed(0), student, teacher,
                                                  gamma=args.gamma, compile=args.compile and args.cache == "static")
            counted["trb_speculative"] = int(rollout.completion_mask.sum())
            counted["acceptance"] = stats.acceptance

        row = {"batch": batch}
        for name, fn in (("student", ours(StudentPolicy(), "student")), ("trb_lockstep", ours(TRBPolicy(args.eps),
                         "trb_lockstep")), ("trb_speculative", speculative), ("hf_generate", hf)):
            with torch.no_grad():
                ms = time_ms(fn, device, warmup=1, repeats=args.repeats)
            row[f"{name}_tokens_per_s"] = round(counted[name] / (ms / 1e3), 1)
            row[f"{name}_ms"] = round(ms, 1)
        row["speculative_acceptance"] = round(counted["acceptance"], 4)
        row["speculative_over_lockstep_time"] = round(row["trb_speculative_ms"] / row["trb_lockstep_ms"], 3)
        rows.append(row)
        synchronize(device)
        print(row, file=sys.stderr)
    emit({"benchmark": "rollout", "device": device_name(device), "torch": torch.__version__, "models": args.models,
          "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "cache": args.cache,
          "compile": args.compile, "lean_decode": engine.LEAN_DECODE, "eps": args.eps, "rows": rows})


if __name__ == "__main__":
    main()
