"""Sampling without host synchronization: the exponential race (Gumbel-max) driven by an explicit generator."""

from __future__ import annotations

import torch

from trb.core.numerics import eager_cpu


def sample(logp: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row from exp(logp), (..., V) -> (...) int64.

    argmax_a logp(a) - log E_a with E_a ~ Exp(1) picks a with probability p(a); -inf entries are never picked.
    """
    race = torch.empty_like(logp, dtype=torch.float32).exponential_(generator=generator)  # (..., V)
    race = race.clamp_min_(torch.finfo(torch.float32).tiny)  # a draw of 0 would win whatever its log-prob
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
# graph). The hash is Wellons' lowbias32 (a bijection of 32-bit integers with low avalanche bias), evaluated in int64:
# a constant c >= 2^31 multiplies as c - 2^32 (the same product mod 2^32), so no product leaves int64's range.
_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_BLOCK = 32_768  # entries per block of keyed_sample's race: the hash's passes over a block stay in cache


def _signed(c: int) -> int:
    """c in [0, 2^32) as the int64 factor with the same product mod 2^32 and |factor| < 2^31."""
    return c - 2**32 if c >= 2**31 else c


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) and a constant c < 2^32."""
    return (x * _signed(c)) & _MASK32


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of int64 x in [0, 2^32), in place (x is a fresh tensor of the caller's); returns x."""
    x ^= x >> 16
    x.mul_(_signed(0x7FEB352D)).bitwise_and_(_MASK32)
    x ^= x >> 15
    x.mul_(_signed(0x846CA68B)).bitwise_and_(_MASK32)
    x ^= x >> 16
    return x


def _row_hash(keys: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """The hash of (key, position, stream) per row, (B,) int64 in [0, 2^32)."""
    row = _mix32_(_mix32_(keys & _MASK32) ^ (positions & _MASK32))  # (B,)
    return _mix32_((row + _mul32(torch.full_like(row, stream & _MASK32), _GOLDEN)) & _MASK32)  # (B,)


def _index_bits(row: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """32 random bits for indices start .. stop - 1 of each row hash (B,): (B, stop - start) int64 in [0, 2^32)."""
    index = torch.arange(start, stop, device=row.device, dtype=torch.int64)  # (n,)
    x = _mix32_(row[:, None] ^ _mul32(index, _GOLDEN))  # (B, n)
    return _mix32_(x.add_(_GOLDEN).bitwise_and_(_MASK32))  # a second round: neighboring indices decorrelate fully


# The largest fp32 below 1. fp32 holds only 2^23 values in [1/2, 1), so (m + 0.5) 2^-24 rounds to 1.0 for the top
# 24-bit value m = 2^24 - 1; the clamp keeps every uniform strictly inside (0, 1).
_BELOW_ONE = 1.0 - 2.0**-24


def _uniform(bits: torch.Tensor) -> torch.Tensor:
    """Uniforms strictly inside (0, 1) from 32-bit hashes, fp32: the top 24 bits, centered in their cell."""
    return (bits >> 8).float().add_(0.5).mul_(2.0**-24).clamp_(max=_BELOW_ONE)


def _exponential_(bits: torch.Tensor) -> torch.Tensor:
    """Exp(1) draws, strictly positive and finite, from 32-bit hashes (B, n) int64 (consumed): fp32 (B, n).

    E = -log(1 - w) with w = (2^32 - 1 - x + 0.5) 2^-32 = 1 - u. A race is decided by its smallest draws (a token of
    probability p wins when its draw is below about p), and those come from small w, which fp32 holds exactly
    (resolution 2^-33 below 2^-8): a token's chance is kept to about 2^-32 however small its probability, and the
    total variation of a draw over V tokens is below 2^-23 + V 2^-32 (3.5e-5 at V = 151,669). w is at most the
    largest fp32 below 1, so no draw is 0 (which would make its token win whatever its probability, forbidden
    tokens included) or infinite.
    """
    w = bits.neg_().add_(_MASK32).float().add_(0.5).mul_(2.0**-32).clamp_(max=_BELOW_ONE)  # (B, n) 1 - u
    return w.neg_().log1p_().neg_()


def keyed_uniform(keys: torch.Tensor, positions: torch.Tensor, stream: int, width: int = 0) -> torch.Tensor:
    """Uniform numbers strictly inside (0, 1), fp32, determined by (key, position, stream, index).

    keys, positions: (B,) int64 (keys in [0, 2^32)). width = 0 gives one number per row, (B,); width = V gives
    (B, V). Distinct (key, position, stream) triples give independent-looking streams; 24 random bits each.
    """
    row = _row_hash(keys, positions, stream)  # (B,)
    if width:
        return _uniform(_index_bits(row, 0, width))  # (B, V)
    return _uniform(row)


def keyed_exponential(keys: torch.Tensor, positions: torch.Tensor, stream: int, width: int) -> torch.Tensor:
    """Exp(1) numbers (B, width) fp32, strictly positive and finite, determined by (key, position, stream, index):
    the race keyed_sample runs (see `_exponential_` for their resolution)."""
    return _exponential_(_index_bits(_row_hash(keys, positions, stream), 0, width))


def keyed_sample(logp: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """`sample` with the exponential race taken from keyed_exponential: (B, V) -> (B,) int64. A -inf entry is never
    picked, whatever the draw.

    In eager CPU code the race runs over blocks of columns, each hashed, raced and reduced while it is in cache (the hash makes
    about thirty passes over its entries); the first block holding the row's maximum gives the first maximal index, as
    one argmax over the row would."""
    batch, width = logp.shape
    row = _row_hash(keys, positions, stream)  # (B,)
    # blocks pay in eager CPU code (cache); on an accelerator each block is a few more kernel launches per drawn token,
    # and compiled code fuses the hash itself (a batch-dependent block count would also recompile per batch size)
    blocked = eager_cpu(logp)
    step = max(1024, _BLOCK // max(batch, 1)) if blocked else width
    best, where = [], []
    for start in range(0, width, step):
        stop = min(width, start + step)
        race = _exponential_(_index_bits(row, start, stop)).log_()  # (B, n) log of an Exp(1) draw, finite
        value, index = (logp[:, start:stop].float() - race).max(-1)  # (B,), (B,)
        best.append(value)
        where.append(index + start)
    if len(best) == 1:
        return where[0]
    block = torch.stack(best, -1).argmax(-1, keepdim=True)  # (B, 1) the first block holding the maximum
    return torch.stack(where, -1).gather(-1, block)[:, 0]  # (B,)
