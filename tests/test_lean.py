"""trb.rollout.lean against the Hugging Face forward: the same next-token logits from a preallocated cache, for every
family it claims, through prefill, single-token steps, multi-token windows, masked slots and row compaction."""

import pytest
import torch

from trb.models import add_lora, tiny_causal_lm
from trb.rollout import StudentPolicy, TRBPolicy, engine, generate, lean, position_ids

from test_rollout import PROMPTS, SPACE, pair

FAMILIES = ["qwen3", "qwen2", "llama", "mistral"]


def family_model(architecture: str, dtype=torch.float64):
    model = tiny_causal_lm(64, 32, 2, architecture=architecture, seed=0, init_std=0.3, tie_word_embeddings=False)
    if architecture == "mistral":
        model.config.sliding_window = None  # as in Mistral 7B v0.2 and later (a window is not supported)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random norm weights and biases, so that skipping one of them would show
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=generator) if "norm" in name
                            else 0.5 * torch.randn(param.shape, generator=generator))
    return model.to(dtype)


@pytest.mark.parametrize("architecture", FAMILIES)
def test_lean_steps_equal_a_full_forward(architecture):
    model = family_model(architecture)
    assert lean.supports(model)
    if architecture == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None  # biases exercised
    generator = torch.Generator().manual_seed(0)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]  # left-padded to 5
    ids = torch.zeros((3, 5), dtype=torch.long)
    mask = torch.zeros((3, 5), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, 5 - len(prompt):], mask[row, 5 - len(prompt):] = torch.tensor(prompt), True
    cache = lean.LeanCache(model, capacity=6)  # small: the buffers must grow
    fed = [position_ids(mask)]  # positions of every fed token, (b, w) per step
    got = [cache.step(ids, mask, fed[0], keep=1)[:, -1]]  # logits after each token checked
    checked = [ids.shape[1] - 1]  # the column each entry of got predicts from
    for width in (1, 1, 3, 1):  # single tokens, a window of three, another single token
        new = torch.randint(2, 64, (3, width), generator=generator)
        fed.append(fed[-1][:, -1:] + 1 + torch.arange(width))  # (b, w)
        ids = torch.cat([ids, new], 1)
        mask = torch.cat([mask, torch.ones_like(new, dtype=torch.bool)], 1)
        if width == 3:
            mask[1, -2] = False  # a rejected draft: masked for every later token
        got += list(cache.step(new, mask, fed[-1], keep=width).unbind(1))  # each (b, V)
        checked += list(range(ids.shape[1] - width, ids.shape[1]))
    # reference: one forward over every token, with the same mask and positions
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask.long(), position_ids=torch.cat(fed, 1)).logits  # (b, L, V)
    for logits, column in zip(got, checked):
        valid = mask[:, column]  # a masked token's own output differs by design (HF masks it from itself)
        torch.testing.assert_close(logits[valid], full[valid, column], rtol=0, atol=1e-9)


@pytest.mark.parametrize("architecture", ["qwen3", "llama"])
def test_lean_keep_compacts_rows(architecture):
    model = family_model(architecture)
    ids = torch.randint(2, 64, (4, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    cache = lean.LeanCache(model)
    cache.step(ids[:, :4], mask[:, :4], position_ids(mask[:, :4]))
    rows = torch.tensor([3, 1])
    cache.keep(rows)
    step = cache.step(ids[rows, 4:5], mask[rows, :5], torch.full((2, 1), 4))[:, -1]
    with torch.no_grad():
        full = model(input_ids=ids[rows, :5]).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-9)


def test_lean_supports_only_what_it_reproduces():
    assert lean.supports(family_model("qwen3"))
    sliding = family_model("mistral")
    sliding.config.sliding_window = 16
    assert not lean.supports(sliding)
    hooked = family_model("llama")
    hooked.model.layers[0].register_forward_pre_hook(lambda module, args: None)
    assert not lean.supports(hooked)
    adapted = add_lora(family_model("qwen3"), rank=2, alpha=4, targets=["q_proj", "v_proj"])
    assert not lean.supports(adapted)  # the adapters would be skipped


def test_lean_under_bf16_autocast_stays_close_to_hugging_face():
    model = family_model("qwen3", torch.float32)
    ids = torch.randint(2, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = lean.LeanCache(model)
        cache.step(ids[:, :6], mask[:, :6], position_ids(mask[:, :6]))
        step = cache.step(ids[:, 6:], mask, torch.full((3, 1), 6))[:, -1].float().log_softmax(-1)
        with torch.no_grad():
            full = model(input_ids=ids).logits[:, -1].float().log_softmax(-1)
    with torch.no_grad():
        exact = model(input_ids=ids).logits[:, -1].log_softmax(-1)
    # the lean path's rounding is of the size of Hugging Face's own under autocast
    assert (step - exact).abs().max() < 3 * (full - exact).abs().max() + 1e-3


@pytest.mark.parametrize("policy", [StudentPolicy(), TRBPolicy(0.1)])
def test_engine_samples_the_same_with_and_without_the_lean_forward(policy, monkeypatch):
    student, teacher = pair()
    rollouts = []
    for flag in (True, False):
        monkeypatch.setattr(engine, "LEAN_DECODE", flag)
        rollouts.append(generate(policy, PROMPTS, SPACE, 12, torch.Generator().manual_seed(3), student=student,
                                 teacher=teacher))
    lean_rollout, hf_rollout = rollouts
    assert torch.equal(lean_rollout.completion_ids, hf_rollout.completion_ids)
    torch.testing.assert_close(lean_rollout.behavior_logp, hf_rollout.behavior_logp, rtol=0, atol=1e-5)


def test_compiled_single_token_step_equals_hugging_face():
    """compile=True: single-token steps through torch.compile (softmax over past and own slot together, no cache
    mutation in the graph), with attention biases, q/k norms, GQA, masked slots, growth and compaction."""
    model = tiny_causal_lm(64, 32, 2, architecture="qwen3", seed=0, init_std=0.3, tie_word_embeddings=False)
    model.config.attention_bias = True
    model = type(model)(model.config).eval()  # rebuilt with biases
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(param.numel()))
    ids = torch.randint(2, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :2] = False  # left padding
    mask[1, 7] = False  # a masked slot in the middle
    positions = position_ids(mask)
    cache = lean.LeanCache(model, capacity=6, compile=True)
    cache.step(ids[:, :5], mask[:, :5], positions[:, :5])
    got = [cache.step(ids[:, j : j + 1], mask[:, : j + 1], positions[:, j : j + 1])[:, -1] for j in range(5, 10)]
    rows = torch.tensor([2, 0])
    cache.keep(rows)
    got += [cache.step(ids[rows, j : j + 1], mask[rows, : j + 1], positions[rows, j : j + 1])[:, -1]
            for j in range(10, 12)]
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits  # (b, L, V)
    for j, logits in zip(range(5, 12), got):
        expected = full[:, j] if j < 10 else full[rows, j]
        valid = mask[:, j] if j < 10 else mask[rows, j]
        torch.testing.assert_close(logits[valid], expected[valid], rtol=0, atol=2e-5)


@pytest.mark.parametrize("architecture", FAMILIES)
def test_final_hidden_equals_hugging_face_forward_and_gradients(architecture):
    """The lean training forward: Hugging Face's final hidden states and parameter gradients (float64), with the
    last layer run only at the kept positions."""
    model = family_model(architecture).train()
    assert lean.trains(model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 64, (3, 7), generator=generator)
    positions = torch.arange(7)[None]  # shared by the rows, as FinalHidden passes them
    keep = torch.tensor([20, 2, 9, 10, 15])  # flat indices into (3 * 7), in no particular order
    projection = torch.randn(len(keep), model.config.hidden_size, generator=generator, dtype=torch.float64)
    results = []
    for forward in ("lean", "hugging face"):
        model.zero_grad()
        if forward == "lean":
            states = lean.final_hidden(model, ids, positions, keep)  # (n, d)
        else:
            out = model.base_model(input_ids=ids, position_ids=positions.expand(3, 7))
            states = out.last_hidden_state.flatten(0, 1)[keep]
        (states * projection).sum().backward()
        results.append((states.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                                          if p.grad is not None}))
    (lean_states, lean_grads), (hf_states, hf_grads) = results
    torch.testing.assert_close(lean_states, hf_states, rtol=0, atol=1e-10)
    assert lean_grads.keys() == hf_grads.keys()
    for name in hf_grads:
        torch.testing.assert_close(lean_grads[name], hf_grads[name], rtol=0, atol=1e-10, msg=name)


def test_lean_trains_only_what_it_reproduces():
    model = family_model("llama").train()
    assert lean.trains(model)
    model.config.attention_dropout = 0.1
    assert not lean.trains(model)  # dropout while training: Hugging Face's forward applies it
    assert lean.trains(model.eval())
    model.config.attention_dropout = 0.0
    model.train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert not lean.trains(model)


def test_final_hidden_equals_the_hugging_face_path_of_the_loss(monkeypatch):
    """FinalHidden with selected positions in length groups: the lean forward and the Hugging Face forward agree."""
    from trb.losses import FinalHidden, completion_select

    student, teacher = pair()
    rollout = generate(StudentPolicy(), PROMPTS, SPACE, 10, torch.Generator().manual_seed(5), student=student)
    ids, mask, positions = rollout.sequences()
    select = completion_select(rollout)
    states = []
    for flag in (True, False):
        monkeypatch.setattr("trb.losses.LEAN_FORWARD", flag)
        with torch.no_grad():
            states.append(FinalHidden(teacher, 2)(ids, mask, positions, select))
    torch.testing.assert_close(states[0], states[1], rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_lean_forwards_on_cuda_equal_hugging_face():
    """On a GPU (`pytest -m gpu`): the lean decode steps (SDPA under a mask, KV heads repeated) and the lean training
    forward (causal SDPA with grouped-query heads) agree with Hugging Face's forward in fp32."""
    device = torch.device("cuda")
    model = family_model("qwen3", torch.float32).to(device).train()
    ids = torch.randint(2, 64, (3, 9), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.arange(9, device=device)[None]
    keep = torch.tensor([3, 10, 26], device=device)
    states = lean.final_hidden(model, ids, positions, keep)
    reference = model.base_model(input_ids=ids, position_ids=positions.expand(3, 9)).last_hidden_state
    torch.testing.assert_close(states, reference.flatten(0, 1)[keep], atol=1e-4, rtol=1e-4)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :2] = False
    with torch.no_grad():
        cache = lean.LeanCache(model.eval())
        cache.step(ids[:, :6], mask[:, :6], position_ids(mask[:, :6]))
        window = cache.step(ids[:, 6:], mask, position_ids(mask)[:, 6:], keep=3)  # (b, 3, V)
        full = model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids(mask)).logits
    torch.testing.assert_close(window, full[:, 6:], atol=1e-4, rtol=1e-4)
