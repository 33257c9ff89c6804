"""The compute dtype of the core math: fp32 for half-precision inputs, float64 kept (for references and gradcheck)."""

from __future__ import annotations

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()
