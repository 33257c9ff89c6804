"""Core math benchmark: the beta solver at (B, V) and the chunked loss against the direct (full-logits) path.

    python benchmarks/bench_core.py                      # CPU-sized defaults
    python benchmarks/bench_core.py --device cuda --tokens 8192 --d-student 2048 --d-teacher 4096

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

from trb.core import blend, chunked_divergence, realized_kl, reverse_kl, solve_beta  # noqa: E402


def loss_inputs(args, device):
    g = torch.Generator(device=device).manual_seed(0)
    h_s = torch.randn(args.tokens, args.d_student, device=device, generator=g, requires_grad=True)
    w_s = (torch.randn(args.vocab, args.d_student, device=device, generator=g) * 0.02).requires_grad_()
    h_t = torch.randn(args.tokens, args.d_teacher, device=device, generator=g)
    w_t = torch.randn(args.vocab, args.d_teacher, device=device, generator=g) * 0.02
    weight = torch.full((args.tokens,), 1.0 / args.tokens, device=device)
    return h_s, w_s, h_t, w_t, weight


def reverse_kl_rows(logits_s, logits_t, rows):
    return reverse_kl(torch.log_softmax(logits_s.float(), -1), torch.log_softmax(logits_t.float(), -1))


def run_loss(path: str, inputs, chunk: int) -> torch.Tensor:
    h_s, w_s, h_t, w_t, weight = inputs
    h_s.grad = w_s.grad = None
    if path == "direct":
        with torch.no_grad():
            logits_t = h_t @ w_t.T  # (N, V)
        loss = (reverse_kl_rows(h_s @ w_s.T, logits_t, None) * weight).sum()
    else:
        loss, _ = chunked_divergence(h_s, w_s, h_t, w_t, weight, reverse_kl_rows, chunk_size=chunk)
    loss.backward()
    return torch.cat([loss.detach().reshape(1), h_s.grad.flatten(), w_s.grad.flatten()])


def child(args) -> None:
    """Measure one loss path in this (fresh) process: peak memory first, then time."""
    device = torch.device(args.device)
    inputs = loss_inputs(args, device)
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
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(solve_beta)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["direct", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    device = torch.device(args.device)

    g = torch.Generator(device=device).manual_seed(0)
    student = torch.log_softmax(torch.randn(args.batch, args.vocab, device=device, generator=g) * 3, -1)
    teacher = torch.log_softmax(torch.randn(args.batch, args.vocab, device=device, generator=g) * 3, -1)
    solve = lambda: solve_beta(student, teacher, args.eps)  # noqa: E731
    solve_ms = time_ms(solve, device, repeats=args.repeats)
    beta = solve()
    compiled_ms = None
    if args.compile:
        compiled = torch.compile(solve_beta, dynamic=False)
        compiled_ms = round(time_ms(lambda: compiled(student, teacher, args.eps), device, repeats=args.repeats), 3)
    max_realized = realized_kl(student, teacher, beta).max().item()

    paths = {}
    for path in ["direct", "chunked"]:
        cmd = [sys.executable, __file__, "--child", path] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "compile")
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        paths[path] = json.loads(out.strip().splitlines()[-1])
    inputs = loss_inputs(args, device)
    grads = {p: run_loss(p, inputs, args.chunk) for p in ["direct", "chunked"]}
    max_diff = (grads["direct"] - grads["chunked"]).abs().max().item()

    emit({
        "benchmark": "core",
        "device": device_name(device),
        "torch": torch.__version__,
        "solve_beta": {"shape": [args.batch, args.vocab], "eps": args.eps, "iters": blend.SOLVER_ITERS,
                       "ms": round(solve_ms, 3), "compiled_ms": compiled_ms, "max_realized_kl": max_realized, "mean_beta": beta.mean().item()},
        "loss": {"tokens": args.tokens, "vocab": args.vocab, "d_student": args.d_student,
                 "d_teacher": args.d_teacher, "chunk": args.chunk,
                 "direct_ms": round(paths["direct"]["ms"], 2), "direct_peak_mib": round(paths["direct"]["peak_mib"]),
                 "chunked_ms": round(paths["chunked"]["ms"], 2),
                 "chunked_peak_mib": round(paths["chunked"]["peak_mib"]),
                 "max_abs_diff_loss_and_grads": max_diff},
    })


if __name__ == "__main__":
    main()
