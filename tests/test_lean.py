"""trb.lean against the Hugging Face forward: what it claims to reproduce, and the training forward's hidden states and
gradients in float64 for every family it claims (decoding over it: tests/test_backends.py)."""

import pytest
import torch

from trb.models import add_lora, tiny_causal_lm
from trb import lean

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


def test_final_hidden_equals_the_hugging_face_path_of_the_loss():
    """FinalHidden with selected positions in length groups: the lean forward and the Hugging Face forward agree."""
    from trb.forward import FinalHidden, completion_select
    from trb.rollout import StudentPolicy, generate

    from test_rollout import PROMPTS, SPACE, pair

    student, teacher = pair()
    rollout = generate(StudentPolicy(), PROMPTS, SPACE, 10, torch.Generator().manual_seed(5), student=student)
    ids, mask, positions = rollout.sequences()
    select = completion_select(rollout)
    states = []
    for forward in ("lean", "hf"):
        with torch.no_grad():
            states.append(FinalHidden(teacher, 2, forward=forward)(ids, mask, positions, select))
    torch.testing.assert_close(states[0], states[1], rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_lean_forwards_on_cuda_equal_hugging_face():
    """On a GPU (`pytest -m gpu`): the lean training forward (causal SDPA with grouped-query heads) agrees with Hugging
    Face's forward in fp32 (the paged decoder on CUDA: tests/test_backends.py)."""
    device = torch.device("cuda")
    model = family_model("qwen3", torch.float32).to(device).train()
    ids = torch.randint(2, 64, (3, 9), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.arange(9, device=device)[None]
    keep = torch.tensor([3, 10, 26], device=device)
    states = lean.final_hidden(model, ids, positions, keep)
    reference = model.base_model(input_ids=ids, position_ids=positions.expand(3, 9)).last_hidden_state
    torch.testing.assert_close(states, reference.flatten(0, 1)[keep], atol=1e-4, rtol=1e-4)
