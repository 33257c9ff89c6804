"""Core math benchmark: the beta solver at (B, V) and the chunked loss against the direct (full-logits) path.

    python benchmarks/bench_core.py                      # CPU-sized defaults
    python benchmarks/bench_core.py --device cuda --tokens 8192 --d-student 2048 --d-teacher 4096 --dtype bf16 \
        --compile --chunks 1024 2048 4096

Loss paths: "direct" forms the full (tokens x V) logits and lets autograd do the rest; "chunked" is
`trb.core.chunked_divergence` (gradients taken inside the forward pass, one chunk of logits at a time) with the
per-token divergence eager, "chunked_compiled" the same with the per-token divergence (log-softmax of both sides,
reverse KL, and its backward) compiled into fused kernels. Equality of loss and gradients with the direct path is
checked in fp32 at the same shape whatever --dtype is timed.

Peak memory is measured for each loss path in a fresh process so the paths do not share allocator state.
The last stdout line is JSON with the device name.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit, peak_memory_mib, time_ms  # noqa: E402

from trb.core import blend, chunked_divergence, realized_kl, reverse_kl, reverse_kl_with_grad, solve_beta  # noqa: E402
from trb.divergences import DIVERGENCES  # noqa: E402
from trb.losses import compiled as compiled_closed_form  # noqa: E402


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PATHS = ["direct", "chunked", "chunked_compiled", "fused", "fused_compiled"]


def loss_inputs(args, device, dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(0)
    h_s = torch.randn(args.tokens, args.d_student, device=device, generator=g)
    w_s = torch.randn(args.vocab, args.d_student, device=device, generator=g) * 0.02
    h_t = torch.randn(args.tokens, args.d_teacher, device=device, generator=g)
    w_t = torch.randn(args.vocab, args.d_teacher, device=device, generator=g) * 0.02
    weight = torch.full((args.tokens,), 1.0 / args.tokens, device=device)
    return (h_s.to(dtype).requires_grad_(), w_s.to(dtype).requires_grad_(), h_t.to(dtype), w_t.to(dtype), weight)


def reverse_kl_logits(logits_s, logits_t):
    return reverse_kl(torch.log_softmax(logits_s.float(), -1), torch.log_softmax(logits_t.float(), -1))  # (n,)


_compiled = {}


def per_token(path: str):
    if path != "chunked_compiled":
        return lambda logits_s, logits_t, rows: reverse_kl_logits(logits_s, logits_t)
    if "fn" not in _compiled:  # the rows slice stays outside: the compiled function sees only the two logits
        _compiled["fn"] = torch.compile(reverse_kl_logits)
    return lambda logits_s, logits_t, rows: _compiled["fn"](logits_s, logits_t)


def logit_grad(path: str, vocab: int, device):
    """The closed form (`reverse_kl_with_grad`): loss and logit gradient in one pass, no autograd."""
    closed_form = DIVERGENCES["reverse_kl"].logit_grad
    fn = compiled_closed_form(closed_form) if path == "fused_compiled" else reverse_kl_with_grad  # as loss.compile does
    no_stops = torch.zeros(1, dtype=torch.long, device=device)  # one stop id: nothing to merge

    def logit_grad_fn(logits_s, logits_t, rows, weight):
        kl, grad, _ = fn(logits_s, logits_t, weight, vocab, no_stops)
        return kl, grad

    return logit_grad_fn


def run_loss(path: str, inputs, chunk: int) -> torch.Tensor:
    h_s, w_s, h_t, w_t, weight = inputs
    h_s.grad = w_s.grad = None
    if path == "direct":
        with torch.no_grad():
            logits_t = h_t @ w_t.T  # (N, V)
        loss = (reverse_kl_logits(h_s @ w_s.T, logits_t) * weight).sum()
    elif path.startswith("fused"):
        loss, _ = chunked_divergence(h_s, w_s, h_t, w_t, weight, None, chunk_size=chunk,
                                     logit_grad_fn=logit_grad(path, w_s.shape[0], h_s.device))
    else:
        loss, _ = chunked_divergence(h_s, w_s, h_t, w_t, weight, per_token(path), chunk_size=chunk)
    loss.backward()
    return torch.cat([loss.detach().float().reshape(1), h_s.grad.float().flatten(), w_s.grad.float().flatten()])


def child(args) -> None:
    """Measure one loss path in this (fresh) process: peak memory first, then time."""
    device = torch.device(args.device)
    inputs = loss_inputs(args, device, DTYPES[args.dtype])
    if args.child.endswith("compiled"):  # compile before measuring memory
        run_loss(args.child, inputs, args.chunk)
    memory = peak_memory_mib(lambda: run_loss(args.child, inputs, args.chunk), device)
    ms = time_ms(lambda: run_loss(args.child, inputs, args.chunk), device, warmup=1, repeats=args.repeats)
    print(json.dumps({"ms": ms, "peak_mib": memory}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64, help="rows for the beta solver")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--eps", type=float, default=0.02)
    parser.add_argument("--tokens", type=int, default=1024, help="rows for the loss")
    parser.add_argument("--d-student", type=int, default=512)
    parser.add_argument("--d-teacher", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=128, help=argparse.SUPPRESS)  # a child's chunk size
    parser.add_argument("--chunks", type=int, nargs="+", default=[128], help="chunk sizes of the chunked loss")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="hidden states and weights, timed")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(solve_beta) and the chunked loss with a compiled divergence")
    parser.add_argument("--skip-solve", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=PATHS,
                        help="loss paths to time (the compiled ones need --compile)")
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    device = torch.device(args.device)

    result = {"benchmark": "core", "device": device_name(device), "torch": torch.__version__}
    if not args.skip_solve:
        g = torch.Generator(device=device).manual_seed(0)
        student = torch.log_softmax(torch.randn(args.batch, args.vocab, device=device, generator=g) * 3, -1)
        teacher = torch.log_softmax(torch.randn(args.batch, args.vocab, device=device, generator=g) * 3, -1)
        solve = lambda: solve_beta(student, teacher, args.eps)  # noqa: E731
        solve_ms = time_ms(solve, device, repeats=args.repeats)
        beta = solve()
        compiled_ms = None
        graphed_ms = None
        if args.compile:
            compiled = torch.compile(solve_beta, dynamic=False)
            compiled_ms = round(time_ms(lambda: compiled(student, teacher, args.eps), device, repeats=args.repeats), 3)
            beta = compiled(student, teacher, args.eps)
            if device.type == "cuda":  # as inside the decode step's CUDA graph: no launch gaps
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    beta = compiled(student, teacher, args.eps)
                graphed_ms = round(time_ms(graph.replay, device, repeats=max(args.repeats, 20)), 3)
        max_realized = realized_kl(student, teacher, beta).max().item()
        result["solve_beta"] = {"shape": [args.batch, args.vocab], "eps": args.eps, "iters": blend.SOLVER_ITERS,
                                "ms": round(solve_ms, 3), "compiled_ms": compiled_ms,
                                "compiled_graphed_ms": graphed_ms, "max_realized_kl": max_realized,
                                "mean_beta": beta.mean().item()}
        print(result["solve_beta"], file=sys.stderr, flush=True)

    def measure(path: str, chunk: int) -> dict:
        cmd = [sys.executable, __file__, "--child", path, f"--chunk={chunk}"] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("child", "compile", "chunk", "chunks", "skip_solve", "paths")
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        found = json.loads(out.strip().splitlines()[-1])
        row = {"path": path, "chunk": chunk if path != "direct" else None, "ms": round(found["ms"], 2),
               "peak_extra_mib": round(found["peak_mib"])}
        print(row, file=sys.stderr, flush=True)
        return row

    paths = [p for p in args.paths if args.compile or not p.endswith("compiled")]
    rows = [measure("direct", 0)] if "direct" in paths else []
    for chunk in args.chunks:
        rows.extend(measure(path, chunk) for path in paths if path != "direct")
    # equality with the direct path, fp32, same shape, smallest chunk size
    inputs = loss_inputs(args, device, torch.float32)
    paths = ["direct"] + [p for p in paths if p != "direct"]
    outs = {p: run_loss(p, inputs, args.chunks[0]) for p in paths}
    diffs = {p: (outs["direct"] - outs[p]).abs().max().item() for p in paths[1:]}
    result["loss"] = {"tokens": args.tokens, "vocab": args.vocab, "d_student": args.d_student,
                      "d_teacher": args.d_teacher, "dtype": args.dtype, "rows": rows,
                      "fp32_max_abs_diff_loss_and_grads": diffs,
                      "fp32_loss": outs["direct"][0].item()}
    emit(result)


if __name__ == "__main__":
    main()
