"""trb.core schedules, sampling and vocabulary merging."""

import math

import pytest
import torch
from scipy import stats
from scipy.stats import chisquare

from trb.core import (constant, cosine_anneal, keyed_exponential, keyed_sample, keyed_uniform, linear_anneal,
                      linear_ramp, merged_logp, sample, with_temperature)


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
            expected = min((torch.tensor(value >> 8, dtype=torch.float32) + 0.5) * 2.0**-24, 1 - 2.0**-24)
            assert got[r, i] == expected  # fp32 as the hash


def test_keyed_sample_over_blocks_is_one_argmax_of_the_race():
    """keyed_sample races a wide vocabulary block by block; the winner is the argmax of the whole race."""
    generator = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 70_000, generator=generator).log_softmax(-1)  # (3, V) several blocks per row
    logp[2, 12_345] = logp[2, 60_001] = 10.0  # a tie across blocks: the first index wins, as in argmax
    keys, positions = torch.tensor([5, 6, 7]), torch.tensor([0, 3, 9])
    race = keyed_exponential(keys, positions, 2, logp.shape[-1])  # (3, V) ~ Exp(1)
    expected = (logp - race.log()).argmax(-1)  # (3,)
    assert torch.equal(keyed_sample(logp, keys, positions, 2), expected)


def _unmix32(x: int) -> int:
    """The inverse of lowbias32 (each step of the hash is a bijection of 32-bit integers)."""
    x ^= x >> 16
    x = (x * pow(0x846CA68B, -1, 2**32)) & 0xFFFFFFFF
    x ^= (x >> 15) ^ (x >> 30)
    x = (x * pow(0x7FEB352D, -1, 2**32)) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _key_for(row_hash: int, stream: int) -> int:
    """The sequence key whose (key, position 0, stream) row hash is row_hash."""
    row = (_unmix32(row_hash) - stream * 0x9E3779B9) & 0xFFFFFFFF
    return _unmix32(_unmix32(row))


def _key_for_index(bits: int, index: int, stream: int) -> int:
    """The key whose race entry `index` at (position 0, stream) has exactly these 32 hash bits."""
    golden = 0x9E3779B9
    x = (_unmix32(bits) - golden) & 0xFFFFFFFF
    return _key_for(_unmix32(x) ^ ((index * golden) & 0xFFFFFFFF), stream)


def test_keyed_uniform_stays_inside_the_unit_interval_at_the_extreme_hashes():
    """Regression (uniform of exactly 1.0): ((2^24 - 1) + 0.5) 2^-24 rounds to 1.0 in fp32. Keys chosen so the row
    hash takes the extreme values (the hash inverted) give uniforms strictly inside (0, 1)."""
    for bits in [0, 1, 255, 256, 2**31, 2**32 - 257, 2**32 - 256, 2**32 - 2, 2**32 - 1]:
        key = _key_for(bits, stream=3)
        assert _lowbias32((_lowbias32(_lowbias32(key)) + 3 * 0x9E3779B9) & 0xFFFFFFFF) == bits
        u = keyed_uniform(torch.tensor([key]), torch.tensor([0]), 3)
        assert 0 < u.item() < 1, f"hash {bits:#x} gave {u.item()!r}"


def test_keyed_race_never_draws_a_forbidden_token_at_the_extreme_hash():
    """Regression (an Exp(1) draw of 0): a race entry whose uniform was 1.0 had draw 0, log-draw -inf, and won
    whatever its log-prob: +inf for a negligible token, NaN (the max) for a forbidden one. With the entry's hash
    forced to each extreme, a forbidden token is never drawn and a negligible one loses to the likely tokens."""
    vocab, index = 151_669, 123_456
    logp = torch.full((1, vocab), -40.0)
    logp[0, :4] = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    for bits in [2**32 - 1, 2**32 - 2, 2**32 - 256, 0]:
        key = torch.tensor([_key_for_index(bits, index, stream=0)])
        race = keyed_exponential(key, torch.tensor([0]), 0, vocab)  # (1, V)
        assert torch.isfinite(race).all() and (race > 0).all()
        forbidden = logp.clone()
        forbidden[0, index] = float("-inf")
        assert keyed_sample(forbidden, key, torch.tensor([0]), 0).item() != index
        assert keyed_sample(logp, key, torch.tensor([0]), 0).item() < 4, "a token of probability e^-40 won"


def test_keyed_sample_at_the_real_vocabulary_follows_the_tail_and_never_a_forbidden_token():
    """End to end at Qwen3's vocabulary (V = 151,669), 10,240 keyed draws: four likely tokens, a tail of 150,000
    tokens holding 1e-3 of the mass (6.7e-9 each: below a 24-bit race's resolution, which drew ~none of them), a
    tail of 600 tokens holding 4e-7, and 1,065 forbidden tokens (-inf, as padded or merged stop ids). Before the
    fix, 0.9% of draws landed on a uniformly random token, tail or forbidden."""
    vocab, draws = 151_669, 10_240
    head = torch.tensor([0.4, 0.3, 0.2, 0.1]) * (1 - 1e-3 - 4e-7)
    wide, small, forbidden = slice(4, 150_004), slice(150_004, 150_604), slice(150_604, vocab)
    logp = torch.empty(vocab, dtype=torch.float64)
    logp[:4] = head.double().log()
    logp[wide] = math.log(1e-3 / 150_000)
    logp[small] = math.log(4e-7 / 600)
    logp[forbidden] = float("-inf")
    keys = torch.arange(draws, dtype=torch.int64) * 7919 + 13
    counts = torch.zeros(vocab, dtype=torch.int64)
    for start in range(0, draws, 512):
        rows = keys[start : start + 512]
        batch = logp.float().expand(len(rows), vocab)
        counts += torch.bincount(keyed_sample(batch, rows, torch.zeros_like(rows), 5), minlength=vocab)
    assert counts[forbidden].sum() == 0
    assert counts[small].sum() <= 2, "4e-7 of the mass: 0.004 draws expected"
    wide_count = int(counts[wide].sum())  # Binomial(10,240, 1e-3): mean 10.2
    assert stats.binom(draws, 1e-3).cdf(wide_count) > 1e-4 and stats.binom(draws, 1e-3).sf(wide_count - 1) > 1e-4
    _, p = stats.chisquare(counts[:4].numpy(), (head / head.sum() * counts[:4].sum()).numpy())
    assert p > 1e-4
