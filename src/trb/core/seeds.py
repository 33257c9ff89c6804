"""Seeded streams: every random draw of a run comes from a generator seeded by (seed, step, rank, stream name, ...),
so a resumed run draws exactly what the uninterrupted run would, on any number of ranks."""

from __future__ import annotations

import hashlib

import torch


def stream_seed(*parts) -> int:
    """A 63-bit seed from (seed, step, rank, stream name, ...): independent streams, reproducible anywhere."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def step_prompts(step: int, per_step: int, num_prompts: int, seed: int) -> list[int]:
    """Indices of the prompts of optimizer step `step`: consecutive slices of a seeded permutation per epoch."""
    orders: dict[int, torch.Tensor] = {}
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(k, num_prompts)
        if epoch not in orders:
            generator = torch.Generator().manual_seed(stream_seed(seed, "data", epoch))
            orders[epoch] = torch.randperm(num_prompts, generator=generator)  # (num_prompts,)
        out.append(int(orders[epoch][offset]))
    return out
