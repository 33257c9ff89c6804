"""The choice of rollout engine without vLLM: the `rollout` config section (defaults, overrides, one-line errors), the
refusal of rollout.engine=vllm where vLLM is missing (before torch loads, and in the trainer), and the log-probs the
loop fills where an engine does not record them (vLLM records neither the student's nor the teacher's)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from trb import preflight
from trb.config import ConfigError, as_dict, load_config
from trb.errors import TrbError
from trb.loading import Setup
from trb.rollout import MixturePolicy, TRBPolicy, generate
from trb.run_folder import identity_differences
from trb.tasks import problem_splits, tokenize_prompts
from trb.train import train
from trb.trainer import Trainer


def config(pair, out_dir, *overrides):
    return load_config(None, [
        f"models.student={pair['student']}", f"models.teacher={pair['teacher']}", f"out_dir={out_dir}",
        "steps=2", "prompts_per_step=4", "rollouts_per_prompt=2", "rollout_batch=8", "micro_batch=8",
        "max_new_tokens=16", "eval_every=0", "eval_samples=1", "data.num_train=64", "data.num_test=4",
        "lr=1e-3", "warmup_steps=0", "checkpoint_every=0", *overrides,
    ])


def test_the_rollout_section_defaults_to_trbs_engine_and_takes_overrides(tiny_pair, tmp_path):
    cfg = config(tiny_pair, tmp_path)
    assert cfg.rollout.engine == "trb" and cfg.rollout.kv_cache_bytes is None and not cfg.rollout.sleep
    cfg = config(tiny_pair, tmp_path, "rollout.engine=vllm", "rollout.kv_cache_bytes=67108864",
                 "rollout.gpu_memory_utilization=0.5", "rollout.max_num_seqs=8", "rollout.enforce_eager=true")
    assert (cfg.rollout.engine, cfg.rollout.kv_cache_bytes, cfg.rollout.gpu_memory_utilization,
            cfg.rollout.max_num_seqs, cfg.rollout.enforce_eager) == ("vllm", 64 << 20, 0.5, 8, True)
    assert as_dict(cfg)["rollout"]["engine"] == "vllm"


@pytest.mark.parametrize("overrides, message", [
    (["rollout.engine=vlm"], "rollout.engine must be trb or vllm, got 'vlm'"),
    (["rollout.gpu_memory_utilization=1.5"], r"rollout.gpu_memory_utilization must be in \(0, 1\], got 1.5"),
    (["rollout.kv_cache_bytes=0"], "rollout.kv_cache_bytes must be > 0"),
    (["rollout.max_num_seqs=0"], "rollout.max_num_seqs must be >= 1, got 0"),
    (["rollout.max_model_len=-1"], "rollout.max_model_len must be >= 0"),
    (["rollout.dtype=int8"], "rollout.dtype must be one of"),
    (["rollout.gpu_mem=0.5"], "unknown config key 'rollout.gpu_mem'; did you mean 'rollout.max_num_seqs'|"
                              "unknown config key 'rollout.gpu_mem'"),
    (["rollout.engine=vllm", "speculative_gamma=2"], "speculative_gamma > 0 needs rollout.engine=trb"),
    (["rollout.engine=vllm", "rollout.sleep=true", "device=cpu"], "rollout.sleep releases GPU memory, and "
                                                                  "device=cpu has none"),
    (["rollout.engine=vllm", "rollout.max_model_len=16"], "rollout.max_model_len=16 leaves no room for a prompt"),
])
def test_bad_rollout_settings_give_one_line(tiny_pair, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        config(tiny_pair, tmp_path, *overrides)
    assert "\n" not in str(error.value)


def test_preflight_refuses_the_vllm_engine_where_vllm_is_not_installed(tiny_pair, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    preflight.train_paths(config(tiny_pair, tmp_path / "a"))  # trb's engine needs nothing more
    with pytest.raises(ConfigError, match=r"rollout.engine=vllm needs vLLM, which is not installed here; install it "
                                          r"with pip install 'trb\[vllm\]'"):
        preflight.train_paths(config(tiny_pair, tmp_path / "b", "rollout.engine=vllm"))


def test_the_trainer_refuses_the_vllm_engine_without_vllm_before_any_step(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(TrbError, match=r"rollout.engine=vllm needs vLLM, which does not import here") as error:
        train(config(tiny_pair, tmp_path / "run", "rollout.engine=vllm"), log=lambda m: None)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_a_run_saved_before_the_rollout_section_existed_resumes(tiny_pair, tmp_path):
    cfg = config(tiny_pair, tmp_path)
    saved = as_dict(cfg)
    del saved["rollout"]
    assert identity_differences(saved, None, cfg, {}) == []
    assert identity_differences(saved, None, dataclasses.replace(cfg, lr=0.5), {}) == [
        "the config differs from the run's at lr"]


def test_filled_token_logps_equal_the_own_engines_records(tiny_pair, loaded_pair):
    """What the loop fills for an engine that records no model log-probs (vLLM) equals what trb's engine records."""
    tokenizer, student, teacher, vocab = loaded_pair
    problems, _ = problem_splits("arith", 8, 1, 0)
    prompts = tokenize_prompts(tokenizer, [p.question for p in problems])
    recorded = generate(TRBPolicy(0.1), prompts, vocab, 20, torch.Generator().manual_seed(0), student=student,
                        teacher=teacher)
    s = Setup(None, None, torch.device("cpu"), student, teacher, tokenizer, vocab, prompts, [], [])
    trainer = SimpleNamespace(s=s, cfg=config(tiny_pair, "unused"), inference=SimpleNamespace(model=student))
    bare = dataclasses.replace(recorded, student_logp=None, teacher_logp=None)
    only_student = Trainer.fill_token_logp(trainer, bare)
    assert only_student.teacher_logp is None
    torch.testing.assert_close(only_student.student_logp, recorded.student_logp, atol=1e-5, rtol=0)
    both = Trainer.fill_token_logp(trainer, bare, teacher=True)
    torch.testing.assert_close(both.teacher_logp, recorded.teacher_logp, atol=1e-5, rtol=0)
    assert Trainer.fill_token_logp(trainer, recorded, teacher=True).student_logp is recorded.student_logp


def test_minillm_trains_alike_when_the_engine_records_no_student_logp(tiny_pair, tmp_path, monkeypatch):
    """MiniLLM's weights read the rollout's student_logp, which vLLM does not record: the loop fills it, and the run
    trains as with trb's engine, which records it."""
    train(config(tiny_pair, tmp_path / "recorded", "method.name=minillm"), log=lambda m: None)
    decode = Trainer.decode

    def unrecorded(self, step, policy, sequences):
        assert isinstance(policy, MixturePolicy)
        return [dataclasses.replace(r, student_logp=None, teacher_logp=None)
                for r in decode(self, step, policy, sequences)]

    monkeypatch.setattr(Trainer, "decode", unrecorded)
    train(config(tiny_pair, tmp_path / "filled", "method.name=minillm", "log_rollouts_every=1"), log=lambda m: None)
    a, b = (load_file(str(tmp_path / name / "checkpoints" / "step_00000002" / "model.safetensors"))
            for name in ("recorded", "filled"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
    logged = (tmp_path / "filled" / "rollouts" / "step_00000001.json").read_text()
    assert '"student_logp": null' not in logged and '"teacher_logp": null' not in logged
