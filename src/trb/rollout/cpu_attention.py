"""Decode attention that reads the paged KV pool in place on the CPU (`paged_attention.cpp`, the operator
`torch.ops.trb.paged_decode_attention`).

In eager torch a paged decoder must first gather every row's slots into a dense copy for the batched matmuls; on a CPU
that copy costs about as much as the attention itself. The kernel follows each row's page table instead: one task per
(row, KV head) reads its keys once for all its queries, then its values, with the softmax in fp32 (fp64 for float64
pools), and reads exactly the filled slots (no padding to a group's longest row).

It is built on first use with `torch.utils.cpp_extension` (a C++ compiler and ninja, one build of about 15 s per
machine, kept in torch's extension directory, TORCH_EXTENSIONS_DIR) for the CPU's vector instructions. Where it cannot
be built, decoding gathers the slots as before, after one warning. TRB_CPU_KERNEL=0 turns it off.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("paged_attention.cpp")
# compiler flags per vector extension torch reports for this CPU (its own kernels' dispatch level)
ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}


def enabled() -> bool:
    """Whether the environment allows the kernel (TRB_CPU_KERNEL unset, or anything but 0 / false / off)."""
    return os.environ.get("TRB_CPU_KERNEL", "1").strip().lower() not in ("0", "false", "off", "no")


@functools.cache
def paged_decode_attention() -> Callable[..., torch.Tensor] | None:
    """The operator, built and loaded once per process; None when it is turned off or cannot be built."""
    if not enabled():
        return None
    isa = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-fopenmp-simd", *ISA_FLAGS.get(isa, [])]
    try:
        from torch.utils.cpp_extension import load

        load(name=f"trb_paged_attention_{isa.lower()}", sources=[str(SOURCE)], extra_cflags=flags,
             is_python_module=False, verbose=False)
    except Exception as error:  # no compiler, no ninja, a read-only cache: decode through the gather instead
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        warnings.warn(f"the CPU paged-attention kernel could not be built ({first_line}); decoding gathers KV slots "
                      "instead (TRB_CPU_KERNEL=0 skips the attempt)", RuntimeWarning, stacklevel=2)
        return None
    return torch.ops.trb.paged_decode_attention
