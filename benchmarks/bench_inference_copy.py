"""What the student's inference copy costs: its memory and the time of a refresh (one per optimizer step).

    python benchmarks/bench_inference_copy.py                       # CPU: random-init Qwen3-0.6B, fp32 student
    python benchmarks/bench_inference_copy.py --device cuda --shape 1.7b

The copy is built as under FSDP2 (a separate model, `sharded=True`) in bf16 and in fp32. On one process a refresh
copies every parameter; under FSDP2 it also all-gathers each one, which this single-process benchmark leaves out.
Memory: the growth of the CUDA allocator (GPU) or of the process's resident set (CPU) while the copy is built.
The last stdout line is JSON with the device name.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit, synchronize, time_ms  # noqa: E402

from trb.inference import InferenceCopy  # noqa: E402
from trb.testing import random_qwen3  # noqa: E402


def allocated_gib(device: torch.device) -> float:
    synchronize(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="0.6b", help="a Qwen3 shape of trb.testing.QWEN3_SHAPES")
    args = parser.parse_args()
    device = torch.device(args.device)
    student = random_qwen3(args.shape, device=device)  # fp32, as training holds it
    params = sum(p.numel() for p in student.parameters())
    result = {"benchmark": "inference_copy", "device": device_name(device), "torch": torch.__version__,
              "shape": args.shape, "params": params, "student_gib": round(4 * params / 2**30, 2)}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        before = allocated_gib(device)
        started = time.perf_counter()
        copy = InferenceCopy(student, dtype, sharded=True)
        synchronize(device)
        result[f"{name}_build_s"] = round(time.perf_counter() - started, 2)
        result[f"{name}_copy_gib"] = round(allocated_gib(device) - before, 2)
        result[f"{name}_refresh_ms"] = round(time_ms(copy.refresh, device, warmup=1, repeats=3), 1)
        assert copy.lean
        del copy
    emit(result)


if __name__ == "__main__":
    main()
