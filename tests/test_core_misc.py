"""trb.core schedules, sampling and vocabulary merging."""

import math

import pytest
import torch
from scipy.stats import chisquare

from trb.core import (constant, cosine_anneal, keyed_sample, keyed_uniform, linear_anneal, linear_ramp, merged_logp,
                      sample, with_temperature)


def test_paper_eps_schedule():
    # eps_k = eps_0 (1 - k / K) for k < K, then 0
    assert linear_anneal(0, 0.02, 50) == 0.02
    assert linear_anneal(25, 0.02, 50) == pytest.approx(0.01)
    assert linear_anneal(49, 0.02, 50) == pytest.approx(0.02 / 50)
    assert linear_anneal(50, 0.02, 50) == 0.0
    assert linear_anneal(400, 0.02, 50) == 0.0
    values = [linear_anneal(k, 0.05, 15) for k in range(20)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError):
        linear_anneal(0, 0.02, 0)


def test_other_schedules():
    assert constant(123, 0.01) == 0.01
    assert cosine_anneal(0, 0.02, 10) == pytest.approx(0.02)
    assert cosine_anneal(5, 0.02, 10) == pytest.approx(0.01)
    assert cosine_anneal(10, 0.02, 10) == 0.0
    # temperature warmup: tau_0 -> 1.0 by step 15
    assert linear_ramp(0, 0.8, 1.0, 15) == pytest.approx(0.8)
    assert linear_ramp(15, 0.8, 1.0, 15) == pytest.approx(1.0)
    assert linear_ramp(30, 0.8, 1.0, 15) == pytest.approx(1.0)
    assert linear_ramp(5, 0.6, 0.0, 10) == pytest.approx(0.3)  # Veto's b decays


def test_sample_matches_distribution_chi_square():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    logp = probs.log().expand(40_000, 6)
    tokens = sample(logp, g)
    assert tokens.shape == (40_000,) and tokens.max() < 5, "zero-probability tokens are never sampled"
    counts = torch.bincount(tokens, minlength=6)[:5].double()
    assert chisquare(counts.numpy(), (probs[:5].double() * 40_000).numpy()).pvalue > 1e-3


def test_sample_is_reproducible_per_generator():
    logp = torch.log_softmax(torch.randn(64, 100), -1)
    a = sample(logp, torch.Generator().manual_seed(7))
    b = sample(logp, torch.Generator().manual_seed(7))
    c = sample(logp, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_with_temperature():
    logp = torch.log_softmax(torch.randn(3, 10), -1)
    torch.testing.assert_close(with_temperature(logp, 1.0), logp)
    sharp = with_temperature(logp, 0.5)
    torch.testing.assert_close(sharp, torch.log_softmax(2 * logp, -1))
    per_row = with_temperature(logp, torch.tensor([1.0, 0.5, 2.0]))
    torch.testing.assert_close(per_row[1], sharp[1])


def test_merged_logp_slices_padding_and_merges_stop_ids():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 12, generator=g)  # 10 real tokens + 2 padded rows
    logits[..., 10:] = 5.0  # padded rows must not take any mass
    single = merged_logp(logits, 10, torch.tensor([9]), 9)
    torch.testing.assert_close(single, torch.log_softmax(logits[..., :10], -1))
    merged = merged_logp(logits, 10, torch.tensor([9, 4]), 9)
    p = torch.softmax(logits[..., :10], -1)
    assert torch.all(merged[..., 4] == -math.inf)
    torch.testing.assert_close(merged[..., 9].exp(), p[..., 9] + p[..., 4])
    torch.testing.assert_close(merged.exp().sum(-1), torch.ones(2, 3))
    keep = [i for i in range(10) if i not in (4, 9)]
    torch.testing.assert_close(merged[..., keep], single[..., keep])


def _lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_keyed_uniform_is_the_lowbias32_hash_in_exact_integers():
    """The int64 tensor hash equals the hash in Python integers, for keys and factors at the top of 32 bits."""
    keys = torch.tensor([0, 1, 2**31, 2**32 - 1])
    positions = torch.tensor([0, 7, 2**31 - 1, 2**32 - 1])
    stream, width, golden = 3, 5, 0x9E3779B9
    got = keyed_uniform(keys, positions, stream, width)  # (4, 5)
    for r, (key, position) in enumerate(zip(keys.tolist(), positions.tolist())):
        row = _lowbias32(_lowbias32(key) ^ position)
        row = _lowbias32((row + stream * golden) & 0xFFFFFFFF)
        for i in range(width):
            value = _lowbias32(_lowbias32(row ^ ((i * golden) & 0xFFFFFFFF)) + golden & 0xFFFFFFFF)
            assert got[r, i] == (torch.tensor(value >> 8, dtype=torch.float32) + 0.5) * 2.0**-24  # fp32 as the hash


def test_keyed_sample_over_blocks_is_one_argmax_of_the_race():
    """keyed_sample races a wide vocabulary block by block; the winner is the argmax of the whole race."""
    generator = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 70_000, generator=generator).log_softmax(-1)  # (3, V) several blocks per row
    logp[2, 12_345] = logp[2, 60_001] = 10.0  # a tie across blocks: the first index wins, as in argmax
    keys, positions = torch.tensor([5, 6, 7]), torch.tensor([0, 3, 9])
    race = -torch.log(keyed_uniform(keys, positions, 2, logp.shape[-1]))  # (3, V) ~ Exp(1)
    expected = (logp - race.log()).argmax(-1)  # (3,)
    assert torch.equal(keyed_sample(logp, keys, positions, 2), expected)
