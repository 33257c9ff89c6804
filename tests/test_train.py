"""The training loop end to end on tiny models: pinned step-0 loss against an independent computation,
determinism, micro-batching invariance, sampler/trainer agreement, resume, config errors."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from trb.config import ConfigError, load_config
from trb.core import merged_logp
from trb.forward import token_logp
from trb.models import load_causal_lm
from trb.rollout import TRBPolicy, generate
from trb.tasks import problem_splits, tokenize_prompts
from trb.core import step_prompts, stream_seed
from trb.train import train


def config(pair, out_dir, *overrides):
    return load_config(None, [
        f"models.student={pair['student']}", f"models.teacher={pair['teacher']}", f"out_dir={out_dir}",
        "steps=3", "prompts_per_step=4", "rollouts_per_prompt=2", "rollout_batch=8", "micro_batch=8",
        "max_new_tokens=20", "eval_every=2", "eval_samples=1", "data.num_train=64", "data.num_test=6",
        "lr=1e-3", "warmup_steps=0", "checkpoint_every=1", "method.name=trb", "method.eps0=0.05",
        "method.horizon=2", *overrides,
    ])


def final_weights(run_dir):
    return load_file(str(sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))


def test_smoke_run_pins_step0_loss_to_an_independent_computation(tiny_pair, tmp_path, loaded_pair):
    cfg = config(tiny_pair, tmp_path / "run")
    summary = train(cfg, log=lambda m: None)
    assert summary["status"] == "completed"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    assert [r["step"] for r in records if "eval/pass_at_1" in r] == [0, 2, 3]
    assert train_records[0]["eps"] == 0.05 and train_records[2]["eps"] == 0.0
    assert train_records[0]["rollout/realized_kl_max"] <= 0.05 + 1e-6
    assert train_records[0]["rollout/mean_beta"] > 0 and train_records[2]["rollout/mean_beta"] == 0

    # Recompute step 0 independently: same prompts and rollout seed, full logits, float64 reverse KL, token mean.
    tokenizer, student, teacher, vocab = loaded_pair
    problems, _ = problem_splits("arith", 64, 6, 0)
    prompts = tokenize_prompts(tokenizer, [p.question for p in problems])
    batch = [prompts[i] for i in step_prompts(0, 4, len(prompts), 0) for _ in range(2)]
    keys = torch.tensor([stream_seed(0, 0, i, "rollout") & 0xFFFFFFFF for i in range(len(batch))])
    rollout = generate(TRBPolicy(0.05), batch, vocab, 20, student=student, teacher=teacher, keys=keys)
    ids, mask, pos = rollout.sequences()
    width, steps = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    stop = vocab.stop_tensor("cpu")
    with torch.no_grad():
        s = merged_logp(student(input_ids=ids, attention_mask=mask, position_ids=pos).logits, vocab.size, stop,
                        vocab.eos_id)[:, width - 1 : width - 1 + steps].double()
        t = merged_logp(teacher(input_ids=ids, attention_mask=mask, position_ids=pos).logits, vocab.size, stop,
                        vocab.eos_id)[:, width - 1 : width - 1 + steps].double()
    kl = (s.exp() * (s - t)).sum(-1)
    expected = kl[rollout.completion_mask].mean().item()
    assert train_records[0]["tokens"] == int(rollout.completion_mask.sum())
    assert train_records[0]["loss"] == pytest.approx(expected, abs=1e-6)


def test_runs_are_deterministic(tiny_pair, tmp_path):
    for name in ("a", "b"):
        train(config(tiny_pair, tmp_path / name, "steps=2"), log=lambda m: None)
    def strip(text):
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "tokens_per_s"))}
                for line in text.splitlines()]

    assert strip((tmp_path / "a" / "metrics.jsonl").read_text()) == strip((tmp_path / "b" / "metrics.jsonl").read_text())
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_one_batch_of_8_equals_8_micro_batches_of_1(tiny_pair, tmp_path):
    train(config(tiny_pair, tmp_path / "one", "steps=1", "micro_batch=8"), log=lambda m: None)
    train(config(tiny_pair, tmp_path / "eight", "steps=1", "micro_batch=1"), log=lambda m: None)
    one, eight = final_weights(tmp_path / "one"), final_weights(tmp_path / "eight")
    initial = load_file(str(tiny_pair["student"] / "model.safetensors"))
    assert max((one[k] - initial[k]).abs().max().item() for k in one) > 1e-4, "the step must change the weights"
    # fp32 summation order differs between the splits; Adam's first step divides each gradient by its own size, so
    # parameters whose gradient is near Adam's eps (1e-8) carry that rounding into the update: a few 1e-6 at lr 1e-3
    assert max((one[k] - eight[k]).abs().max().item() for k in one) <= 2e-6


def test_run_summary_names_the_hugging_face_decoder_under_forward_hf(tiny_pair, tmp_path):
    """The summary said "lean" whenever the lean decoder supported the student, even when models.forward=hf had the
    Hugging Face forward decode every rollout."""
    assert train(config(tiny_pair, tmp_path / "auto", "steps=1"), log=lambda m: None)["decoder"] == "lean"
    summary = train(config(tiny_pair, tmp_path / "hf", "steps=1", "models.forward=hf"), log=lambda m: None)
    assert summary["decoder"] == "hugging face"


def test_sampler_logps_equal_trainer_logps(tiny_pair, loaded_pair):
    tokenizer, student, teacher, vocab = loaded_pair
    problems, _ = problem_splits("arith", 16, 1, 0)
    prompts = tokenize_prompts(tokenizer, [p.question for p in problems])
    rollout = generate(TRBPolicy(0.1), prompts, vocab, 30, torch.Generator().manual_seed(0), student=student,
                       teacher=teacher)
    torch.testing.assert_close(rollout.student_logp, token_logp(student, rollout, vocab), atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.teacher_logp, token_logp(teacher, rollout, vocab), atol=1e-5, rtol=0)


def test_resume_continues_exactly(tiny_pair, tmp_path):
    train(config(tiny_pair, tmp_path / "full", "steps=4"), log=lambda m: None)
    train(config(tiny_pair, tmp_path / "split", "steps=2"), log=lambda m: None)
    train(config(tiny_pair, tmp_path / "split", "steps=4", "resume=true"), log=lambda m: None)
    full, split = final_weights(tmp_path / "full"), final_weights(tmp_path / "split")
    assert all(torch.equal(full[k], split[k]) for k in full)
    def drop_time(path):
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "tokens_per_s"))}
                for line in path.read_text().splitlines()]

    assert drop_time(tmp_path / "full" / "metrics.jsonl") == drop_time(tmp_path / "split" / "metrics.jsonl")


def test_config_errors_are_clear(tiny_pair, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'method.esp0'; did you mean 'method.eps0'\?"):
        config(tiny_pair, tmp_path, "method.esp0=0.1")
    with pytest.raises(ConfigError, match="steps must be an integer"):
        config(tiny_pair, tmp_path, "steps=many")
    with pytest.raises(ConfigError, match="eps0 must be a finite number >= 0"):
        config(tiny_pair, tmp_path, "method.eps0=-1")
    with pytest.raises(ConfigError, match="eps0 must be a finite number >= 0"):
        config(tiny_pair, tmp_path, "method.eps0=.nan")
    with pytest.raises(ConfigError, match="unknown method 'trbb'"):
        config(tiny_pair, tmp_path, "method.name=trbb")
    with pytest.raises(ConfigError, match="autocast must be auto, bf16 or fp32, got 'fp16'"):
        config(tiny_pair, tmp_path, "autocast=fp16")
    with pytest.raises(ConfigError, match="length_groups must be >= 1, got 0"):
        config(tiny_pair, tmp_path, "loss.length_groups=0")
    cfg = config(tiny_pair, tmp_path / "run", "steps=1")
    train(cfg, log=lambda m: None)
    with pytest.raises(ConfigError, match="already holds a run; pass resume=true"):
        train(cfg, log=lambda m: None)
    with pytest.raises(ConfigError, match="config differs .* at lr"):
        train(config(tiny_pair, tmp_path / "run", "steps=1", "lr=0.1", "resume=true"), log=lambda m: None)
    assert math.isfinite(cfg.lr)


def test_lora_student_trains_adapters_only_and_exports_a_merged_model(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = config(tiny_pair, tmp_path / "lora", "steps=2", "models.lora_rank=4", "models.lora_targets=q_proj,v_proj")
    train(cfg, log=lambda m: None)
    saved = final_weights(tmp_path / "lora")
    initial = load_file(str(tiny_pair["student"] / "model.safetensors"))
    base = {k.replace(".base_layer", ""): v for k, v in saved.items() if ".lora_" not in k}
    assert all(torch.equal(base[k], initial[k]) for k in initial), "the base weights stay frozen"
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in saved.items()), "the adapters learned"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "merged").eval()
    lora_model = load_causal_lm(str(tiny_pair["student"]), torch.device("cpu"))
    from trb.models import add_lora

    lora_model = add_lora(lora_model, 4, 16.0, ["q_proj", "v_proj"])
    lora_model.load_state_dict(saved, strict=False)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, lora_model(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("divergence", ["topk_student_weighted_kl", "topk_reverse_kl", "sampled_reverse_kl"])
def test_recorded_teacher_logps_replace_the_teacher_pass(divergence, tiny_pair, loaded_pair):
    """The loss from the teacher log-probs recorded while decoding equals the loss with a teacher pass."""
    from trb.losses import LossSpec, distill_loss

    tokenizer, student, teacher, vocab = loaded_pair
    problems, _ = problem_splits("arith", 12, 1, 0)
    prompts = tokenize_prompts(tokenizer, [p.question for p in problems])
    rollout = generate(TRBPolicy(0.1), prompts, vocab, 20, torch.Generator().manual_seed(0), student=student,
                       teacher=teacher, record_topk=16)
    weight = rollout.completion_mask.float() / rollout.completion_mask.sum()
    results = {}
    for reuse in (True, False):
        student.zero_grad()
        loss, per_token, diagnostics = distill_loss(student, teacher, rollout, vocab,
                                                    LossSpec(divergence=divergence, reuse_teacher=reuse), weight)
        loss.backward()
        results[reuse] = (loss.item(), per_token, [p.grad.clone() for p in student.parameters()], diagnostics)
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-5)
    torch.testing.assert_close(results[True][1], results[False][1], atol=1e-5, rtol=0)
    for a, b in zip(results[True][2], results[False][2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the diagnostics are the full-vocabulary KL(pi_S || pi_T) and H(pi_T) either way (recorded while decoding),
    # never the loss's own top-k or sampled-token estimate
    reused, passed = results[True][3], results[False][3]
    assert set(reused) == set(passed) == {"teacher_kl", "teacher_entropy"}
    for name in reused:
        torch.testing.assert_close(reused[name], passed[name], atol=1e-5, rtol=1e-5)
    mask = rollout.completion_mask
    assert (reused["teacher_kl"][mask] - results[True][1][mask]).abs().max() > 1e-3, "the estimate differs"


@pytest.mark.parametrize("divergence", ["topk_student_weighted_kl", "sampled_reverse_kl"])
def test_the_logged_teacher_kl_is_the_full_kl_whatever_the_loss_reads(divergence, tiny_pair, tmp_path):
    # TRB's warmup with a loss that reuses the records: the step's teacher-KL and teacher entropy are the same
    # full-vocabulary values a teacher pass gives (adaptive TRB steers on the former)
    logged = {}
    for reuse in ("true", "false"):
        out = tmp_path / reuse
        train(config(tiny_pair, out, "steps=2", "eval_every=0", f"loss.divergence={divergence}", "loss.top_k=4",
                     f"loss.reuse_teacher={reuse}"), log=lambda m: None)
        logged[reuse] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                         if "loss" in json.loads(line)]
    for name in ("teacher_kl", "teacher_entropy"):
        assert [r[name] for r in logged["true"]] == pytest.approx([r[name] for r in logged["false"]], rel=1e-4)
    assert abs(logged["true"][0]["loss"] - logged["true"][0]["teacher_kl"]) > 1e-3, "the loss's estimate differs"


def test_choosing_another_method_resets_its_parameters(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("models: {student: s, teacher: t}\nmethod: {name: trb, eps0: 0.05, horizon: 7}\n")
    assert load_config(path).method.horizon == 7
    skd = load_config(path, ["method.name=skd", "method.top_k=5"]).method
    assert skd.name == "skd" and skd.top_k == 5
    assert load_config(path, ["method.name=trb"]).method.eps0 == 0.05, "the same method keeps the file's values"
    with pytest.raises(ConfigError, match="unknown config key 'method.eps0'"):
        load_config(path, ["method.name=skd", "method.eps0=0.1"])


def test_length_groups_change_no_loss_or_gradient(tiny_pair, loaded_pair):
    """Running the training forwards in groups of similar length, each row's tokens moved to the front (no padding
    inside a row, no attention mask), gives the hidden states of one padded rectangle under its mask, and the same
    loss, per-token values and gradients for any number of groups."""
    from trb.forward import FinalHidden, aligned_groups, completion_select
    from trb.losses import LossSpec, distill_loss

    tokenizer, student, teacher, vocab = loaded_pair
    problems, _ = problem_splits("arith", 12, 1, 0)
    prompts = tokenize_prompts(tokenizer, [p.question for p in problems])
    rollout = generate(TRBPolicy(0.1), prompts, vocab, 30, torch.Generator().manual_seed(3), student=student,
                       teacher=teacher)
    ids, mask, positions = rollout.sequences()
    spans = aligned_groups(mask, 4)
    assert sorted(torch.cat([rows for rows, _ in spans]).tolist()) == list(range(len(prompts)))
    assert mask.sum() <= sum(columns.numel() for _, columns in spans) < mask.numel(), "grouping cuts padding"
    for rows, columns in spans:  # a row's aligned tokens are its attended tokens, in order
        for row, cols in zip(rows.tolist(), columns):
            n = int(mask[row].sum())
            assert torch.equal(ids[row, cols[:n]], ids[row][mask[row]])
    gapped = mask.clone()
    gapped[0, mask[0].nonzero()[1, 0]] = False
    assert aligned_groups(gapped, 4) is None  # not contiguous: the caller keeps the mask
    select = completion_select(rollout)
    assert int(select.sum()) == int(rollout.completion_mask.sum())
    with torch.no_grad():
        reference = student.base_model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        for groups in (1, 4):
            torch.testing.assert_close(FinalHidden(student, groups)(ids, mask, positions, select), reference[select],
                                       atol=1e-5, rtol=0)
    weight = rollout.completion_mask.float() / rollout.completion_mask.sum()
    results = {}
    for groups in (1, 4):
        student.zero_grad()
        loss, per_token, diagnostics = distill_loss(student, teacher, rollout, vocab, LossSpec(length_groups=groups),
                                                    weight)
        loss.backward()
        results[groups] = (loss.item(), per_token, diagnostics["teacher_entropy"],
                           [p.grad.clone() for p in student.parameters()])
    assert results[1][0] == pytest.approx(results[4][0], abs=1e-6)
    for a, b in zip(results[1][1:3], results[4][1:3]):  # fp32 rounding of the same sums in other shapes
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for a, b in zip(results[1][3], results[4][3]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_trains_on_cpu_close_to_fp32(tiny_pair, tmp_path):
    """autocast=bf16 runs the same step in mixed precision: same tokens, step-0 loss within bf16 rounding."""
    losses = {}
    for mode in ("fp32", "bf16"):
        train(config(tiny_pair, tmp_path / mode, "steps=1", f"autocast={mode}"), log=lambda m: None)
        record = next(json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
                      if "loss" in json.loads(line))
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        losses[mode] = record["loss"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_least_padding_split_is_optimal():
    """The dynamic program's runs against every way of cutting small sorted batches into runs of two rows or more."""
    import itertools

    from trb.forward import least_padding_split

    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        n, groups = (int(x) for x in torch.randint(1, 9, (2,), generator=generator))
        lengths = torch.randint(1, 60, (n,), generator=generator).sort().values
        bounds = least_padding_split(lengths, groups)
        least = min(2, n)
        k = max(1, min(groups, n // least))
        assert bounds[0] == 0 and bounds[-1] == n and len(bounds) == k + 1
        assert all(b - a >= least for a, b in zip(bounds, bounds[1:]))

        def padded(cuts):
            return sum((b - a) * int(lengths[b - 1]) for a, b in zip(cuts, cuts[1:]))

        best = min(padded(cuts) for cuts in ([0, *c, n] for c in itertools.combinations(range(1, n), k - 1))
                   if all(b - a >= least for a, b in zip(cuts, cuts[1:])))
        assert padded(bounds) == best


def test_compiled_loss_equals_eager_loss(loaded_pair):
    """loss.compile: the training forwards (dynamic shapes, in length groups of any size) and the closed-form reverse
    KL through torch.compile give the eager loss, per-token values and gradients, for two rollouts of other shapes."""
    from trb.losses import LossSpec, distill_loss

    tokenizer, student, teacher, vocab = loaded_pair
    problems, _ = problem_splits("arith", 10, 1, 0)
    prompts = tokenize_prompts(tokenizer, [p.question for p in problems])
    for seed, new_tokens in ((3, 24), (4, 17)):
        rollout = generate(TRBPolicy(0.1), prompts, vocab, new_tokens, torch.Generator().manual_seed(seed),
                           student=student, teacher=teacher)
        weight = rollout.completion_mask.float() / rollout.completion_mask.sum()
        results = []
        for compile in (False, True):
            student.zero_grad()
            loss, per_token, _ = distill_loss(student, teacher, rollout, vocab, LossSpec(compile=compile), weight)
            loss.backward()
            results.append((loss.item(), per_token, [p.grad.clone() for p in student.parameters()]))
        assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
        torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-5)
        for a, b in zip(results[0][2], results[1][2]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
