"""Token reductions that do not depend on how a batch is split into micro-batches or ranks."""

from __future__ import annotations

import torch


def token_mean(per_token: torch.Tensor, mask: torch.Tensor, num_tokens: int | float | torch.Tensor) -> torch.Tensor:
    """sum(per_token * mask) / num_tokens, a scalar.

    per_token, mask: (B, T); num_tokens: the count of valid tokens in the whole optimizer step (all micro-batches,
    all ranks), given by the caller. Masked positions never contribute, even if they hold inf/NaN; a fully masked
    batch gives 0 and still carries a gradient path (of zeros) to per_token.
    """
    masked = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))  # (B, T)
    denom = torch.as_tensor(num_tokens, dtype=masked.dtype, device=masked.device).clamp_min(1.0)
    return masked.sum() / denom
