"""Sampling without host synchronization: the exponential race (Gumbel-max) driven by an explicit generator."""

from __future__ import annotations

import torch


def sample(logp: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row from exp(logp), (..., V) -> (...) int64.

    argmax_a logp(a) - log E_a with E_a ~ Exp(1) picks a with probability p(a); -inf entries are never picked.
    """
    race = torch.empty_like(logp, dtype=torch.float32).exponential_(generator=generator)  # (..., V)
    return (logp.float() - race.log()).argmax(dim=-1)


def with_temperature(logp: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """log softmax(logp / tau), (..., V) fp32; tau may be a float or a (...) tensor."""
    tau = torch.as_tensor(temperature, dtype=torch.float32, device=logp.device)
    if tau.dim() > 0:
        tau = tau[..., None]
    return torch.log_softmax(logp.float() / tau, dim=-1)
