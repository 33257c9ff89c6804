"""The CPU paged-attention kernel (`trb.rollout.cpu_attention`) against attention over gathered slots in float64:
grouped queries, windows (causal within the window), head sizes with and without a compiled-in size, scattered pages,
rows of different lengths; its independence from the batch around a row; its checks; and the fallback when it cannot
be built."""

import warnings

import pytest
import torch

from trb.rollout import cpu_attention
from trb.rollout.backends import PagedDecoder

from test_lean import family_model
from test_backends import SPACE

PAGE = 4  # slots per page in these tests (the decoder uses PAGE_SLOTS)


@pytest.fixture(scope="module")
def op():
    kernel = cpu_attention.paged_decode_attention()
    assert kernel is not None, "the kernel must build here (a C++ compiler and ninja)"
    return kernel


def reference(q, pool, table, lengths, scaling):
    """Attention of q (b, H, w, D) over each row's slots gathered from pool (2 H_kv, S, D), in float64, one query at
    a time: (b, w, H * D)."""
    batch, heads, width, dim = q.shape
    kv_heads = pool.shape[0] // 2
    slots = (table[:, :, None] * PAGE + torch.arange(PAGE)).flatten(1)  # (b, P * PAGE)
    out = torch.zeros(batch, width, heads, dim, dtype=torch.float64)
    for row in range(batch):
        for i in range(width):
            seen = slots[row, : int(lengths[row]) - (width - 1 - i)]
            for head in range(heads):
                kv = head // (heads // kv_heads)
                keys, values = pool[kv, seen].double(), pool[kv_heads + kv, seen].double()
                weights = (keys @ q[row, head, i].double() * scaling).softmax(0)
                out[row, i, head] = weights @ values
    return out.flatten(2)


def case(heads, kv_heads, width, dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([width, 5, 17, 9, 30])  # slots filled, the window's included
    pages_per_row = 8
    pool_pages = 64
    table = torch.randperm(pool_pages, generator=generator)[: len(lengths) * pages_per_row].view(-1, pages_per_row)
    pool = torch.randn(2 * kv_heads, pool_pages * PAGE, dim, generator=generator, dtype=torch.float64).to(dtype)
    q = torch.randn(len(lengths), heads, width, dim, generator=generator, dtype=torch.float64).to(dtype)
    return q, pool, table, lengths


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("dim", [8, 32])  # 32 is compiled in, 8 takes the general loop
def test_kernel_equals_attention_over_gathered_slots_in_float64(op, heads, kv_heads, width, dim):
    q, pool, table, lengths = case(heads, kv_heads, width, dim, torch.float64)
    got = op(q, pool, table, lengths, PAGE, 0.3)
    torch.testing.assert_close(got, reference(q, pool, table, lengths, 0.3), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_lower_precisions_accumulate_in_fp32(op, dtype, atol):
    q, pool, table, lengths = case(8, 2, 2, 64, dtype)
    got = op(q, pool, table, lengths, PAGE, 0.125)  # inputs rounded to dtype; only the output rounds again
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), reference(q, pool, table, lengths, 0.125), rtol=0, atol=atol)


def test_strided_queries_are_read_in_place(op):
    q, pool, table, lengths = case(4, 2, 3, 32, torch.float32)
    wider = torch.cat([q, q[:, :2]], 1)  # queries as a slice of a wider tensor, as the decoder passes them
    torch.testing.assert_close(op(wider[:, :4], pool, table, lengths, PAGE, 0.2), op(q, pool, table, lengths, PAGE, 0.2),
                               rtol=0, atol=0)


def test_a_row_does_not_depend_on_its_batch_or_where_its_pages_lie(op):
    q, pool, table, lengths = case(4, 2, 1, 32, torch.float32)
    batch = op(q, pool, table, lengths, PAGE, 0.2)
    moved = torch.zeros_like(pool)
    new_ids = torch.arange(table.shape[1]) + 40  # row 3's pages moved elsewhere in another pool
    for old, new in zip(table[3].tolist(), new_ids.tolist()):
        moved[:, new * PAGE:(new + 1) * PAGE] = pool[:, old * PAGE:(old + 1) * PAGE]
    alone = op(q[3:4], moved, new_ids[None], lengths[3:4], PAGE, 0.2)
    assert torch.equal(alone[0], batch[3])


@pytest.mark.parametrize("change,message", [
    (lambda q, pool, table, lengths: (q, pool, table, lengths + 100), "slots"),
    (lambda q, pool, table, lengths: (q, pool, table + 1000, lengths), "outside the pool"),
    (lambda q, pool, table, lengths: (q.double(), pool, table, lengths), "dtypes differ"),
])
def test_bad_inputs_raise_a_clear_error(op, change, message):
    args = change(*case(4, 2, 1, 32, torch.float32))
    with pytest.raises(RuntimeError, match=message):
        op(*args, PAGE, 0.2)


def test_decoder_attends_through_the_kernel_and_reads_only_filled_slots():
    model = family_model("qwen3", torch.float32)
    kernel, gather = PagedDecoder(model, SPACE), PagedDecoder(model, SPACE, cpu_kernel=False)
    assert kernel.kernel is not None and gather.kernel is None
    lengths = [3, 40, 41, 90, 7]
    prompts = [[2 + (i % 50)] * n for i, n in enumerate(lengths)]
    kernel.add(prompts), gather.add(prompts)
    for width in (1, 3):
        tokens = torch.full((len(lengths), width), 5)
        torch.testing.assert_close(kernel.step(tokens), gather.step(tokens), rtol=0, atol=1e-5)
    assert kernel.reads.read == kernel.reads.filled == 2 * sum(lengths) + (1 + 4) * len(lengths)  # ends of steps 1, 2


def test_a_failed_build_warns_once_and_decoding_gathers(monkeypatch):
    import torch.utils.cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken)
    cpu_attention.paged_decode_attention.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built \\(Ninja is required to load C\\+\\+ extensions\\)"):
            assert cpu_attention.paged_decode_attention() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert PagedDecoder(family_model("qwen3", torch.float32), SPACE).kernel is None  # cached: no second try
    finally:
        cpu_attention.paged_decode_attention.cache_clear()


def test_the_environment_turns_it_off(monkeypatch):
    monkeypatch.setenv("TRB_CPU_KERNEL", "0")
    cpu_attention.paged_decode_attention.cache_clear()
    try:
        assert cpu_attention.paged_decode_attention() is None
    finally:
        cpu_attention.paged_decode_attention.cache_clear()
