"""The inference copy the rollouts and evaluation decode: plain, complete, merged, current; `compile: auto`."""

import copy
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from trb.config import ConfigError, load_config
from trb.inference import InferenceCopy
from trb.rollout.factory import decode_compile
from trb.models import add_lora, lora_layers, merged_lora_model
from trb import lean
from trb.rollout import TRBPolicy, generate

ROOT = Path(__file__).resolve().parents[1]


def prompts(vocab, count=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    stops = set(vocab.stop_ids) | {vocab.pad_id}
    out = []
    for k in range(count):
        ids = torch.randint(0, vocab.size, (3 + 2 * k,), generator=generator).tolist()
        out.append([i for i in ids if i not in stops] or [0])
    return out


def rollout(student, teacher, vocab, seed=0):
    return generate(TRBPolicy(0.05), prompts(vocab), vocab, 16, torch.Generator().manual_seed(seed), student=student,
                    teacher=teacher)


def test_a_plain_replicated_student_is_its_own_copy(loaded_pair):
    _, student, _, _ = loaded_pair
    inference = InferenceCopy(student, torch.float32, sharded=False)
    assert inference.model is student and inference.lean
    inference.refresh()  # nothing to do
    assert inference.model is student


def test_a_copy_in_another_dtype_holds_the_weights_in_that_dtype(loaded_pair):
    """bf16 decoding on a GPU: the copy is made directly in the decode dtype."""
    _, student, _, _ = loaded_pair
    inference = InferenceCopy(student, torch.bfloat16, sharded=False)
    assert inference.model is not student and inference.lean
    for (name, p), (copy_name, q) in zip(student.named_parameters(), inference.model.named_parameters(), strict=True):
        assert name == copy_name and q.dtype == torch.bfloat16 and not q.requires_grad
        assert torch.equal(q, p.detach().to(torch.bfloat16))
    assert inference.model.get_input_embeddings().weight is inference.model.get_output_embeddings().weight, "ties kept"


def perturbed_lora(student, seed):
    """LoRA adapters whose B is not zero (PEFT initializes it to zero, which would merge to the base model)."""
    model = add_lora(student, rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


def test_lora_copy_decodes_what_the_adapted_model_decodes_and_follows_a_step(loaded_pair):
    _, student, teacher, vocab = loaded_pair
    student = perturbed_lora(student, seed=0)
    inference = InferenceCopy(student, torch.float32, sharded=False)
    assert not lean.supports(student), "the adapted student keeps the Hugging Face forward"
    assert inference.lean and inference.model is not student
    assert not any(".lora_" in name for name, _ in inference.model.named_parameters())

    def same_rollouts():
        peft, merged = rollout(student, teacher, vocab), rollout(inference.model, teacher, vocab)
        assert torch.equal(peft.completion_ids, merged.completion_ids)
        assert peft.completion_mask.sum() > 16
        for name in ("student_logp", "teacher_logp", "behavior_logp", "beta"):
            torch.testing.assert_close(getattr(merged, name), getattr(peft, name), atol=2e-5, rtol=0)
        return merged

    before = same_rollouts()
    for name, layer in lora_layers(student).items():  # PEFT's own delta
        expected = layer.get_base_layer().weight + layer.get_delta_weight("default")
        torch.testing.assert_close(inference.model.get_submodule(name).weight, expected, atol=1e-6, rtol=0)

    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=5e-2)
    ids = torch.tensor(prompts(vocab, 1)[0] * 4)[None]  # (1, L)
    student(input_ids=ids).logits.logsumexp(-1).mean().backward()
    optimizer.step()
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    stale = inference.model.state_dict()[q_proj].clone()
    inference.refresh()
    assert (inference.model.state_dict()[q_proj] - stale).abs().max() > 1e-3, "the step moved the merged weight"
    after = same_rollouts()
    assert not torch.equal(before.student_logp, after.student_logp)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank in this process: FSDP2 shards (hooks, DTensor parameters) without torchrun."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("with_lora", [False, True])
def test_copy_of_an_fsdp2_student_is_plain_complete_and_follows_a_step(loaded_pair, one_rank_group, with_lora):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from trb.distributed import replicated_params

    _, student, teacher, vocab = loaded_pair
    if with_lora:
        student = perturbed_lora(student, seed=1)
    twin = copy.deepcopy(student)  # trained side by side, unsharded: the reference
    inference = InferenceCopy(student, torch.float32, sharded=True)  # built before sharding, as the trainer does
    for layer in student.base_model.layers:  # as trb.distributed.wrap shards the student
        fully_shard(layer)
    fully_shard(student.base_model, ignored_params=set(replicated_params(student)))
    assert any(isinstance(p, DTensor) for p in student.parameters())
    assert not lean.supports(student), "the lean decoder refuses the sharded student"
    assert inference.lean, "but supports its inference copy"

    def check():
        reference = (merged_lora_model(twin) if with_lora else twin).state_dict()
        for name, p in inference.model.named_parameters():
            torch.testing.assert_close(p, reference[name], atol=1e-5, rtol=0)

    check()
    ids = torch.tensor(prompts(vocab, 1)[0] * 4)[None]  # (1, L)
    for model in (student, twin):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        hidden = model.base_model(input_ids=ids).last_hidden_state  # (1, L, d); the student's through FSDP2 hooks
        (hidden.square().mean() + model.lm_head(hidden).logsumexp(-1).mean()).backward()
        optimizer.step()
    stale = {n: p.clone() for n, p in inference.model.named_parameters()}
    inference.refresh()
    check()
    moved = max((p - stale[n]).abs().max().item() for n, p in inference.model.named_parameters())
    assert moved > 1e-3, "the copy followed the optimizer step"
    assert rollout(inference.model, teacher, vocab).completion_mask.any()


def test_compile_auto_compiles_on_a_gpu_and_decodes_eagerly_on_a_cpu(tiny_pair):
    assert decode_compile("auto", torch.device("cuda", 0)) is True
    assert decode_compile("auto", torch.device("cpu")) is False
    assert decode_compile(True, torch.device("cpu")) is True
    assert decode_compile(False, torch.device("cuda")) is False
    models = [f"models.student={tiny_pair['student']}", f"models.teacher={tiny_pair['teacher']}"]
    assert load_config(None, models).compile == "auto"
    assert load_config(None, [*models, "compile=true"]).compile is True
    with pytest.raises(ConfigError, match="compile must be auto, true or false, got 'fast'"):
        load_config(None, [*models, "compile=fast"])
    for name in ("qwen3_0.6b_from_4b", "qwen3_1.7b_from_8b"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.compile == "auto" and cfg.distributed == "fsdp"
