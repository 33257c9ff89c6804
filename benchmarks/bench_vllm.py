"""Rollout throughput of the vLLM engine (`trb.vllm`) beside trb's own engine: the student alone and the TRB blend,
on the same prompts. Information only (the vLLM build and the machine decide it).

    .venv-vllm/bin/python benchmarks/bench_vllm.py                          # the shipped miniature pair
    .venv-vllm/bin/python benchmarks/bench_vllm.py --models qwen3-scaled    # Qwen3-0.6B / 4B shapes at 1/8 width
    python benchmarks/bench_vllm.py --device cuda --models qwen3-0.6b-4b --dtype bfloat16 --batch 64 \
        --new-tokens 7168 --lengths traces --rollout-batch 16      # full size, the recipe's cap, vLLM's CUDA build

--lengths cap (the default) lets every sequence run to --new-tokens (random-init models almost never emit EOS: the
cap's worst case); --lengths traces gives sequence i a length drawn like reasoning traces (bench_rollout's
`trace_lengths`: log-normal, mean about a quarter of the cap, a tail that reaches it), as vLLM's per-request
max_tokens and as a policy wrapper that ends the own engine's sequence there, so both engines decode the same tokens.
--rollout-batch is the own engine's KV budget in sequences (its `rollout_batch`; default: all at once); vLLM's is
--kv-cache-mib.

Tokens/s counts generated completion tokens per second of wall time (median of repeats, after a warm-up call; the
vLLM engine's start is not timed); ms per step is a call's wall time over its longest completion (the decode steps
a call takes; the prompt pass included). The last stdout line is JSON with the device name and the vLLM version.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollout import ScriptedLengths, trace_lengths  # noqa: E402
from common import device_name, emit, time_ms  # noqa: E402

from trb.models import load_causal_lm, load_tokenizer, vocab_space  # noqa: E402
from trb.rollout import StudentPolicy, TRBPolicy, generate  # noqa: E402
from trb.vllm.engine import VLLMEngine, VLLMSettings  # noqa: E402


def pair_folders(kind: str, scratch: Path) -> tuple[str, str]:
    if kind == "miniature":
        return "trb:miniature/arith/student", "trb:miniature/arith/teacher"
    from trb.testing import random_qwen3_pair

    paths = random_qwen3_pair(scratch, "0.6b", "4b", scale=0.125 if kind == "qwen3-scaled" else 1.0)
    return str(paths["student"]), str(paths["teacher"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", choices=["miniature", "qwen3-scaled", "qwen3-0.6b-4b"], default="miniature")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-cache-mib", type=int, default=512)
    parser.add_argument("--lengths", choices=["cap", "traces"], default="cap")
    parser.add_argument("--rollout-batch", type=int, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        student_path, teacher_path = pair_folders(args.models, Path(scratch))
        tokenizer = load_tokenizer(student_path)
        student = load_causal_lm(student_path, device, args.dtype)
        teacher = load_causal_lm(teacher_path, device, args.dtype)
        vocab = vocab_space(tokenizer, load_tokenizer(teacher_path), student, teacher)
        prompts = torch.randint(2, min(vocab.size, 30_000), (args.batch, args.prompt_tokens),
                                generator=torch.Generator().manual_seed(0)).tolist()
        keys = torch.arange(args.batch)  # (B,) also the index into lengths
        if args.lengths == "traces":
            lengths = trace_lengths(args.batch, args.new_tokens)  # (B,)
            caps = lengths.tolist()
        else:
            lengths, caps = None, args.new_tokens
        budget = {"batch": args.rollout_batch} if args.rollout_batch else {}
        engine = VLLMEngine(student_path, teacher_path, vocab, VLLMSettings(
            kv_cache_bytes=args.kv_cache_mib << 20, dtype=args.dtype, max_num_seqs=args.batch))
        counted, row = {}, {}
        for policy in (StudentPolicy(), TRBPolicy(args.eps)):
            def on_vllm(policy=policy):
                counted["vllm"] = engine.generate(policy, prompts, caps, keys).completion_mask

            def on_trb(policy=policy):
                own = policy if lengths is None else ScriptedLengths(policy, lengths, vocab.eos_id, forbid_stop=False)
                rollout = generate(own, prompts, vocab, args.new_tokens, student=student, teacher=teacher,
                                   keys=keys, **budget)
                counted["trb"] = rollout.completion_mask

            for engine_name, fn in (("vllm", on_vllm), ("trb", on_trb)):
                with torch.no_grad():
                    ms = time_ms(fn, device, warmup=1, repeats=args.repeats)
                mask = counted[engine_name]  # (B, T) the last call's completion tokens
                row[f"{engine_name}_{policy.name}_tokens_per_s"] = round(int(mask.sum()) / (ms / 1e3), 1)
                row[f"{engine_name}_{policy.name}_ms_per_step"] = round(ms / int(mask.sum(-1).max()), 2)
                print(engine_name, policy.name, row[f"{engine_name}_{policy.name}_tokens_per_s"], file=sys.stderr)
        engine.close()
    import vllm

    emit({"benchmark": "vllm_rollout", "device": device_name(device), "vllm": vllm.__version__,
          "torch": torch.__version__, "models": args.models, "batch": args.batch, "prompt_tokens": args.prompt_tokens,
          "new_tokens": args.new_tokens, "lengths": args.lengths, "rollout_batch": args.rollout_batch,
          "mean_length": None if lengths is None else round(float(lengths.float().mean()), 1), "eps": args.eps,
          "dtype": args.dtype, **row})


if __name__ == "__main__":
    main()
