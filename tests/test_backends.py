"""Decoder backends against one full Hugging Face forward: prompt passes added in stages, single tokens and windows,
truncated drafts, rows leaving and joining, a pool that must grow; and the length groups that bound KV reads."""

import pytest
import torch

from trb.core import merged_logp
from trb.models import VocabSpace
from trb.rollout import HFDecoder, PagedDecoder
from trb.rollout.backends import PAGE_SLOTS, kv_bytes_per_token, length_groups

from test_lean import FAMILIES, family_model

SPACE = VocabSpace(size=64, stop_ids=(1,), eos_id=1, pad_id=0)


def reference(model, tokens: list[int]) -> torch.Tensor:
    """Log-probs after every token of one unpadded sequence, from a full forward, (L, V)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0]
    return merged_logp(logits, SPACE.size, SPACE.stop_tensor("cpu"), SPACE.eos_id)


def check(got: torch.Tensor, model, tokens: list[int], atol: float) -> None:
    torch.testing.assert_close(got, reference(model, tokens)[-1], rtol=0, atol=atol)


@pytest.mark.parametrize("backend", ["paged", "paged-gather", "hf"])  # paged: the CPU kernel; paged-gather: without
@pytest.mark.parametrize("architecture", FAMILIES)
def test_decoder_equals_a_full_forward_through_every_operation(backend, architecture):
    model = family_model(architecture)  # float64
    atol = 1e-9
    if backend == "hf":
        dec = HFDecoder(model, SPACE)
    else:  # one page to start with: the pool must grow
        dec = PagedDecoder(model, SPACE, pages=1, cpu_kernel=backend == "paged")
        assert (dec.kernel is not None) == (backend == "paged")
    generator = torch.Generator().manual_seed(0)
    seqs = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27]]
    first = dec.add(seqs[:2])  # (2, V): rows join in two stages
    first = torch.cat([first, dec.add(seqs[2:])])
    for row, seq in enumerate(seqs):
        check(first[row], model, seq, atol)
    for width in (1, 3, 1, 2):
        new = torch.randint(2, 64, (dec.rows, width), generator=generator)
        out = dec.step(new)  # (b, w, V)
        for row, seq in enumerate(seqs):
            for i in range(width):
                check(out[row, i], model, seq + new[row, : i + 1].tolist(), atol)
            seqs[row] = seq + new[row].tolist()
        if width == 3:  # speculative rejections: rows forget 2, 0 and 3 of the window
            drop = torch.tensor([2, 0, 3])
            dec.truncate(drop)
            seqs = [seq[: len(seq) - n] for seq, n in zip(seqs, drop.tolist())]
    dec.keep(torch.tensor([2, 0]))  # row 1 leaves; the others swap order
    seqs = [seqs[2], seqs[0]]
    joined = dec.add([[30, 31, 32, 33]])  # and a new sequence takes its place
    seqs.append([30, 31, 32, 33])
    check(joined[0], model, seqs[2], atol)
    new = torch.randint(2, 64, (3, 1), generator=generator)
    out = dec.step(new)
    for row, seq in enumerate(seqs):
        check(out[row, 0], model, seq + new[row].tolist(), atol)


def test_paged_reads_stay_near_the_filled_slots():
    """Without the CPU kernel (as on an accelerator), where rows gather their slots by length group."""
    model = family_model("qwen3", torch.float32)
    dec = PagedDecoder(model, SPACE, cpu_kernel=False)
    lengths = [3, 40, 41, 90, 7, 100, 64, 12]
    dec.add([[2 + (i % 50)] * n for i, n in enumerate(lengths)])
    dec.step(torch.full((len(lengths), 1), 5))
    assert dec.reads.filled == sum(lengths) + len(lengths)
    assert dec.reads.read <= 1.2 * dec.reads.filled
    # KV memory follows the tokens: the pool holds at least the filled slots and is sized in pages
    assert dec.kv_bytes >= 2 * 2 * (sum(lengths) + len(lengths)) * 2 * 8 * 4
    assert dec.kv_bytes == dec.capacity * PAGE_SLOTS * kv_bytes_per_token(model, dtype_bytes=4)


def test_length_groups_bound_padding_and_cover_every_row():
    lengths = [100, 3, 97, 50, 7, 80, 81, 6, 120]
    groups = length_groups(lengths, slack=1.25)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
    for group in groups:
        longest = lengths[group[0]]
        assert all(lengths[r] <= longest and longest <= 1.25 * lengths[r] for r in group)
    merged = length_groups(lengths, slack=1.25, max_groups=2)
    assert len(merged) == 2 and sorted(r for g in merged for r in g) == list(range(len(lengths)))


@pytest.mark.slow  # compiling the step takes minutes on a CPU
def test_compiled_single_token_steps_equal_a_full_forward():
    """compile=True: single-token steps run the compiled `_one_token` (past slots and the token's own key in one
    softmax, the new keys and values written after it); windows and prompt passes stay eager."""
    model = family_model("qwen3", torch.float32)
    dec = PagedDecoder(model, SPACE, pages=1, compile=True)
    generator = torch.Generator().manual_seed(0)
    seqs = [[5, 6, 7], [8, 9], list(range(10, 30))]
    dec.add(seqs)
    for width in (1, 1, 3, 1):
        new = torch.randint(2, 64, (dec.rows, width), generator=generator)
        out = dec.step(new)  # (b, w, V)
        for row, seq in enumerate(seqs):
            seqs[row] = seq + new[row].tolist()
            check(out[row, -1], model, seqs[row], 1e-5)
    dec.keep(torch.tensor([2, 0]))
    seqs = [seqs[2], seqs[0]]
    out = dec.step(torch.tensor([[3], [4]]))
    for row, token in enumerate((3, 4)):
        check(out[row, 0], model, seqs[row] + [token], 1e-5)
