"""The compute dtype of the core math (fp32 for half-precision inputs, float64 kept, for references and gradcheck), and
where the math may take data-dependent shortcuts."""

from __future__ import annotations

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def eager_cpu(x: torch.Tensor) -> bool:
    """Whether code on x runs eagerly on the CPU: there a data-dependent branch costs a comparison, while compiled or
    traced code (a graph break) and accelerators (a host sync per branch) run the static path."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
