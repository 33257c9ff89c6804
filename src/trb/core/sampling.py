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


# Keyed randomness: every random number of a rollout is a hash of (sequence key, position, stream, index), so a
# sequence's tokens do not depend on which other sequences share its batch, on their order, or on the number of ranks,
# and no generator state is carried between steps (the draws need no host synchronization and can be captured in a
# graph). The hash is Wellons' lowbias32 (a bijection of 32-bit integers with low avalanche bias), evaluated in int64
# with 16-bit limbs so that no product overflows.
_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) and a constant c < 2^32; products stay below 2^49."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def keyed_uniform(keys: torch.Tensor, positions: torch.Tensor, stream: int, width: int = 0) -> torch.Tensor:
    """Uniform numbers in (0, 1), fp32, determined by (key, position, stream, index).

    keys, positions: (B,) int64 (keys in [0, 2^32)). width = 0 gives one number per row, (B,); width = V gives
    (B, V). Distinct (key, position, stream) triples give independent-looking streams; 24 random bits each.
    """
    row = _mix32((_mix32(keys & _MASK32) ^ (positions & _MASK32)) & _MASK32)  # (B,)
    row = _mix32((row + _mul32(torch.full_like(row, stream & _MASK32), _GOLDEN)) & _MASK32)  # (B,)
    if width:
        index = torch.arange(width, device=keys.device, dtype=torch.int64)  # (V,)
        row = _mix32((row[:, None] ^ _mul32(index, _GOLDEN)) & _MASK32)  # (B, V)
        row = _mix32((row + _GOLDEN) & _MASK32)  # (B, V) a second round: neighboring indices decorrelate fully
    return ((row >> 8).float() + 0.5) * 2.0**-24


def keyed_sample(logp: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """`sample` with the exponential race taken from keyed_uniform: (B, V) -> (B,) int64."""
    race = -torch.log(keyed_uniform(keys, positions, stream, logp.shape[-1]))  # (B, V) ~ Exp(1)
    return (logp.float() - race.log()).argmax(dim=-1)
