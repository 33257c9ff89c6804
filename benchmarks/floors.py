"""Hardware floors of the GPU benchmarks' shapes, from parameter counts, cache sizes and FLOPs (no GPU needed).

    python benchmarks/floors.py                         # at the H200's measured 4.15 TB/s and 782 TFLOP/s
    python benchmarks/floors.py --bandwidth 3.35e12     # another card

The models are built on the meta device (no memory, no weights) with the shapes `bench_decode.py` uses, to count
parameters. A decode step must read the weights it multiplies by (bf16: all but the input embedding, whose 64 rows
are a lookup) and the whole static KV cache (attention reads every slot); the beta solver reads two fp32 (B x V)
tensors per Newton iteration; the 8,192-token loss does the student's output-layer forward and two backward
products and the teacher's output-layer forward. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

from trb.core import blend  # noqa: E402
from trb.testing import random_qwen3  # noqa: E402


def decode_bytes(model, batch: int, cache_len: int, dtype_bytes: int = 2) -> dict:
    config = model.config
    embedding = model.get_input_embeddings().weight
    read = sum(p.numel() for p in model.parameters() if p is not embedding)
    if model.get_output_embeddings().weight is embedding:  # tied: the output layer reads the embedding matrix
        read += embedding.numel()
    cache = 2 * config.num_hidden_layers * batch * config.num_key_value_heads * cache_len * config.head_dim
    return {"params": sum(p.numel() for p in model.parameters()), "weight_bytes": read * dtype_bytes,
            "cache_bytes": cache * dtype_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidth", type=float, default=4.15e12, help="bytes/s (copy, read + write counted)")
    parser.add_argument("--flops", type=float, default=782e12, help="bf16 matmul FLOP/s")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cache-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-student", type=int, default=2048)
    parser.add_argument("--d-teacher", type=int, default=4096)
    args = parser.parse_args()
    result = {"benchmark": "floors", "bandwidth": args.bandwidth, "flops": args.flops, "decode": {}}
    total = 0.0
    for role, shape in (("student", "1.7b"), ("teacher", "8b")):
        model = random_qwen3(shape, device="meta", dtype=torch.bfloat16)
        found = decode_bytes(model, args.batch, args.cache_len)
        found["ms"] = round((found["weight_bytes"] + found["cache_bytes"]) / args.bandwidth * 1e3, 2)
        result["decode"][role] = found
        total += found["ms"]
    solver_bytes = blend.SOLVER_ITERS * 2 * args.batch * args.vocab * 4
    result["solve_beta_ms"] = round(solver_bytes / args.bandwidth * 1e3, 2)
    result["lockstep_step_ms"] = round(total + result["solve_beta_ms"], 2)
    loss_flops = 2 * args.tokens * args.vocab * (3 * args.d_student + args.d_teacher)
    result["loss"] = {"tflop": round(loss_flops / 1e12, 2), "ms": round(loss_flops / args.flops * 1e3, 1)}
    emit(result)


if __name__ == "__main__":
    main()
