"""Training and evaluation through vLLM (rollout.engine=vllm) on the shipped miniature pair: `trb train` runs OPD and
TRB end to end with sane records, the adapter's student follows a real optimizer step of trb's loss, and settings
vLLM cannot run are one line before any step.

Run with `make test-vllm` (vLLM's own environment); the default suite deselects the `vllm` marker.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from trb.divergences import LossSpec
from trb.forward import token_logp
from trb.losses import distill_loss
from trb.models import load_causal_lm, load_tokenizer, vocab_space
from trb.rollout import StudentPolicy, TeacherPolicy, TRBPolicy

pytestmark = pytest.mark.vllm

PAIR = "trb:miniature/arith/"
SMALL = ["rollout.engine=vllm", "rollout.kv_cache_bytes=67108864", "rollout.enforce_eager=true", "steps=3", "prompts_per_step=4", "rollouts_per_prompt=2", "data.num_train=200",
         "data.num_test=8", "eval_every=0", "eval_samples=1", "checkpoint_every=0", "log_rollouts_every=1",
         "warmup_steps=0"]


SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src")


def environment() -> dict:
    """The subprocess's environment: this checkout's trb first (whatever the environment's install points at)."""
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}


def trb_train(*args: str) -> subprocess.CompletedProcess:
    env = environment()
    return subprocess.run([sys.executable, "-m", "trb", "train", "trb:configs/miniature_arith.yaml", *args],
                          capture_output=True, text=True, env=env, timeout=900)


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["opd", "trb"])
def test_trb_train_runs_end_to_end_on_vllm(tmp_path, method):
    """3 steps of OPD / TRB with every rollout and evaluation from vLLM: finite losses, the behavior records of the
    method (OPD: beta 0, no KL spent; TRB: beta in (0, 1), KL(mu || pi_S) at most eps_k at every token), evaluations
    at the start and the end, and a logged rollout whose student log-probs (filled by the training forward of the
    student after 2 updates) equal vLLM's behavior log-probs under OPD: the engine samples the trained student. The
    OPD run stops after 2 steps and resumes for the third, so that rollout comes from the engine of the resumed run,
    which must hold the checkpoint's student, not the one on disk."""
    run = tmp_path / method
    for steps in ([2, 3] if method == "opd" else [3]):
        done = trb_train(*SMALL, f"method.name={method}", f"out_dir={run}", f"steps={steps}",
                         *(["resume=true"] if steps == 3 and method == "opd" else []))
        assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["decoder"] == "vllm" and summary["status"] == "completed"
    lines = metrics(run)
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert [m["step"] for m in lines if "eval/pass_at_1" in m] == ([0, 2, 3] if method == "opd" else [0, 3])
    for m in steps:
        assert math.isfinite(m["loss"]) and m["loss"] > 0 and m["tokens"] > 0
        assert 0 < m["rollout/length"] <= 96 and 0 <= m["rollout/stop_rate"] <= 1
        if method == "opd":
            assert m["rollout/mean_beta"] == 0 and m["rollout/realized_kl"] == 0
        else:
            assert 0 < m["rollout/mean_beta"] < 1 and m["rollout/frac_beta_one"] < 1
            assert 0 < m["rollout/realized_kl"] <= m["rollout/realized_kl_max"] <= m["eps"] * (1 + 1e-4)
    logged = json.loads((run / "rollouts" / "step_00000002.json").read_text())["rollouts"]
    assert logged and all(r["student_logp"] is not None and r["teacher_logp"] is not None for r in logged)
    if method == "opd":
        gaps = [abs(a - b) for r in logged for a, b in zip(r["student_logp"], r["behavior_logp"])]
        assert max(gaps) < 1e-4


def test_the_adapters_student_follows_a_real_optimizer_step(tmp_path):
    """One AdamW step of trb's loss on the adapter's own rollouts, then `update_student`: the engine's student
    log-probs are the trained student's to 1e-5 (and no longer the initial one's), the teacher's are unchanged."""
    from trb.vllm.engine import VLLMSettings
    from trb.vllm.rollouts import VLLMRollouts

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(PAIR + "student")
    student = load_causal_lm(PAIR + "student", torch.device("cpu"))
    teacher = load_causal_lm(PAIR + "teacher", torch.device("cpu"))
    vocab = vocab_space(tokenizer, tokenizer, student, teacher)
    initial = copy.deepcopy(student).double()
    prompts = [tokenizer.encode(q) for q in ("12+7=", "3*4-5=", "(8-2)*3=", "9-4*2=")]
    settings = VLLMSettings(kv_cache_bytes=64 << 20, dtype="float32", enforce_eager=True)
    engine = VLLMRollouts(PAIR + "student", PAIR + "teacher", vocab, settings, student, longest=64)
    try:
        rollout = engine.rollout(TRBPolicy(0.1), prompts, 16, torch.arange(4))
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
        mask = rollout.completion_mask.float()
        loss, _, _ = distill_loss(student, teacher, rollout, vocab, LossSpec(), mask / mask.sum())
        loss.backward()
        optimizer.step()
        engine.update_student(student)
        trained = copy.deepcopy(student).double()
        for policy, model, other in ((StudentPolicy(), trained, initial), (TeacherPolicy(), teacher.double(), None)):
            sampled = engine.rollout(policy, prompts, 16, torch.arange(10, 14))
            mask = sampled.completion_mask
            reference = token_logp(model, sampled, vocab)  # (B, T) float64
            assert (reference - sampled.behavior_logp.double())[mask].abs().max() < 1e-5
            if other is not None:
                assert (token_logp(other, sampled, vocab) - sampled.behavior_logp.double())[mask].abs().max() > 1e-3
        assert engine.stats.tokens > 0 and engine.stats.rows == 4 and engine.stats.batch == settings.max_num_seqs
    finally:
        engine.close()


@pytest.mark.parametrize("overrides, message", [
    (["rollout.kv_cache_bytes=4096"], "trb: error: vLLM cannot start the student engine: .*; check "
                                      "gpu_memory_utilization, kv_cache_bytes"),
    (["rollout.max_model_len=100"], r"trb: error: the run's longest sequence \(\d+ tokens: prompt \+ "
                                    r"max_new_tokens\) does not fit max_model_len=100"),
    (["rollout.sleep=true"], "trb: error: vllm sleep mode needs CUDA"),
])
def test_settings_vllm_cannot_run_are_one_line_before_any_step(tmp_path, overrides, message):
    run = tmp_path / "run"
    done = trb_train(*SMALL, *overrides, f"out_dir={run}")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("trb: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert re.match(message, errors[0]), errors[0]
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip()


def test_the_trl_vllm_example_runs_quick(tmp_path):
    """examples/trl_vllm.py --quick: TRL's DistillationTrainer with use_vllm=True, every completion from trb's vLLM
    engine: the blend at step 1 (eps 0.02 spent in full: KL(mu || pi_S) = eps), the student alone at step 2 (eps
    0), the trained student saved."""
    env = environment()
    script = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "trl_vllm.py")
    done = subprocess.run([sys.executable, script, "--quick", "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, env=env, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    logs = [json.loads(found.replace("'", '"')) for found in re.findall(r"\{'loss'[^}]*\}", done.stdout + done.stderr)]
    assert len(logs) == 2, done.stderr[-3000:]
    first, second = ({k: float(v) for k, v in log.items()} for log in logs)
    assert first["trb/eps"] == 0.02 and 0 < first["trb/beta"] < 1 and 0.019 <= first["trb/realized_kl"] <= 0.02
    assert second["trb/eps"] == 0 and second["trb/beta"] == 0 and second["trb/realized_kl"] == 0
    assert math.isfinite(first["loss"]) and math.isfinite(second["loss"])
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_a_teacher_whose_stack_cannot_share_the_engine_is_one_line_before_any_step(tmp_path):
    from trb.paths import resolve_builtin

    teacher = tmp_path / "teacher"
    shutil.copytree(resolve_builtin(PAIR + "teacher"), teacher)
    config = json.loads((teacher / "config.json").read_text())
    layers = ["sliding_attention"] * config["num_hidden_layers"]
    (teacher / "config.json").write_text(json.dumps({**config, "layer_types": layers, "use_sliding_window": True,
                                                     "sliding_window": 64}))
    done = trb_train(*SMALL, f"models.teacher={teacher}", f"out_dir={tmp_path / 'run'}")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("trb: error:")]
    assert errors == ["trb: error: the teacher model has ['sliding_attention'] attention layers (or a sliding window); "
                      "the blend engine shares one KV cache between full-attention stacks only; use "
                      "rollout.engine=trb"], done.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_auto_dtype_samples_in_the_students_dtype_not_the_checkpoints_bf16():
    """The shipped pair is stored in bf16 and trains in fp32: with rollout.dtype=auto vLLM holds fp32 weights, as the
    own engine decodes the fp32 student (vLLM's own "auto" would be the checkpoint's bf16: an off-policy sampler)."""
    from trb.vllm.engine import VLLMSettings
    from trb.vllm.rollouts import VLLMRollouts

    student = load_causal_lm(PAIR + "student", torch.device("cpu"))
    tokenizer = load_tokenizer(PAIR + "student")
    assert json.loads(open(os.path.join(student.name_or_path, "config.json")).read())["dtype"] == "bfloat16"
    vocab = vocab_space(tokenizer, tokenizer, student, student)
    engine = VLLMRollouts(PAIR + "student", None, vocab, VLLMSettings(kv_cache_bytes=16 << 20, enforce_eager=True),
                          student)
    try:
        engine.engine.start(StudentPolicy())
        assert engine.engine.settings.dtype == "float32"
        assert {p.dtype for p in engine.engine.model.parameters()} == {torch.float32}
    finally:
        engine.close()


def test_prompts_beyond_one_steps_token_budget_do_not_crash_the_cpu_builds_seeded_sampler():
    """An evaluation's 800 prompts (~15k tokens) exceed one vLLM step's token budget; with chunked prefill, vLLM's
    CPU build discards a partly prefilled request's token and rewinds its seeded generator, which a CPU generator
    cannot do ("CPU Generator does not use offset"). The engine prefills whole prompts there; every request ends."""
    from trb.vllm.engine import VLLMSettings
    from trb.vllm.rollouts import VLLMRollouts

    tokenizer = load_tokenizer(PAIR + "student")
    student = load_causal_lm(PAIR + "student", torch.device("cpu"))
    vocab = vocab_space(tokenizer, tokenizer, student, student)
    prompts = [tokenizer.encode(f"Question: a = {i}, b = a + {i * 7 % 50}, c = b - 3, d = c * 2. Find d.\nAnswer:\n")
               for i in range(800)]
    assert sum(map(len, prompts)) > 8192  # vLLM's default token budget of a step
    engine = VLLMRollouts(PAIR + "student", None, vocab, VLLMSettings(kv_cache_bytes=64 << 20, enforce_eager=True),
                          student)
    try:
        rollout = engine.rollout(StudentPolicy(), prompts, 4, torch.arange(len(prompts)))
        assert rollout.completion_mask.sum(1).min() >= 1 and rollout.completion_ids.shape == (800, 4)
    finally:
        engine.close()
