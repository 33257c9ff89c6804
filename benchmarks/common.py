"""Shared benchmark plumbing: device naming, synchronized timing, peak memory, JSON on the last line."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import time
from typing import Callable

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of fn in milliseconds, after warm-up, synchronized before and after every call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Extra peak memory of fn in MiB: CUDA allocator peak on GPU; on CPU the growth of the process's max RSS
    (meaningful when fn runs first in a fresh process, which the benchmarks arrange)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def emit(result: dict) -> None:
    """Human-readable lines first, then the JSON record as the last line of stdout."""
    for key, value in result.items():
        print(f"{key}: {value}", file=sys.stderr)
    print(json.dumps(result))
