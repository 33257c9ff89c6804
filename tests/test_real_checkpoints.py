"""The bring-your-own-models path on random-init checkpoints with the real Qwen3 vocabulary, EOS ids and chat
template: both paper configs pass --dry-run; tokenizer and template checks catch mismatches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import normalizers

from trb.cli import main
from trb.config import load_config
from trb.models import CompatibilityError, load_causal_lm, load_tokenizer, vocab_space
from trb.tasks import load_problems
from trb.testing import QWEN3_PADDED_VOCAB, qwen3_like_tokenizer, random_qwen3_pair
from trb.loading import check_same_tokenization
from trb.train import dry_run

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "tests" / "data" / "gsm8k" / "test.jsonl"


@pytest.fixture(scope="module")
def qwen_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    return {
        "qwen3_1.7b_from_8b": random_qwen3_pair(root / "large", "1.7b", "8b", scale=1 / 32),
        "qwen3_0.6b_from_4b": random_qwen3_pair(root / "small", "0.6b", "4b", scale=1 / 32),
    }


@pytest.mark.parametrize("name", ["qwen3_1.7b_from_8b", "qwen3_0.6b_from_4b"])
def test_paper_config_dry_run_on_scaled_down_qwen3(name, qwen_pairs, tmp_path):
    pair = qwen_pairs[name]
    out_dir = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", [
        f"models.student={pair['student']}", f"models.teacher={pair['teacher']}", f"data.source={GSM8K}",
        "data.num_train=1000", "data.num_test=100", f"out_dir={out_dir}", "device=cpu"])
    assert cfg.max_new_tokens == 7168 and cfg.lr == 1e-5 and cfg.loss.top_k == 16
    assert cfg.method.eps0 == 0.02 and cfg.method.horizon == 50
    report = dry_run(cfg, log=lambda m: None)
    assert report["dry_run"] == "ok"
    assert report["vocab_size"] == 151_669, "padded rows (151,936) are sliced to the real vocabulary"
    assert report["stop_ids"] == [151_643, 151_645], "base <|endoftext|> and chat <|im_end|> merge into one stop"
    assert report["eos_emitted"] == 151_643, "the merged stop event is emitted as the student's EOS"
    assert not out_dir.exists(), "a dry run writes nothing to out_dir"


def test_dry_run_from_the_command_line(qwen_pairs, tmp_path, capsys):
    pair = qwen_pairs["qwen3_0.6b_from_4b"]
    code = main(["train", str(ROOT / "configs" / "qwen3_0.6b_from_4b.yaml"), "--dry-run",
                 f"models.student={pair['student']}", f"models.teacher={pair['teacher']}", f"data.source={GSM8K}",
                 "data.num_test=10", f"out_dir={tmp_path / 'run'}", "device=cpu"])
    assert code == 0 and '"dry_run": "ok"' in capsys.readouterr().out
    code = main(["train", str(ROOT / "configs" / "qwen3_0.6b_from_4b.yaml"), "--dry-run",
                 f"models.student={pair['student']}", "models.teacher=/nowhere", f"out_dir={tmp_path / 'run'}"])
    assert code == 2


@pytest.mark.parametrize("name", ["qwen3_0.6b_from_4b", pytest.param("qwen3_1.7b_from_8b", marks=pytest.mark.slow)])
def test_paper_config_dry_run_under_two_fsdp2_ranks_decodes_with_the_lean_forward(name, qwen_pairs, tmp_path):
    """`torchrun --nproc_per_node 2 -m trb train CONFIG --dry-run` on CPU (gloo), the config's own `distributed:
    fsdp` and `compile: auto`: every rank decodes its share with the plain inference copy through the lean forward
    (the sharded student itself would fall back to the Hugging Face forward)."""
    pair = qwen_pairs[name]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trb",
               "train", str(ROOT / "configs" / f"{name}.yaml"), "--dry-run", f"models.student={pair['student']}",
               f"models.teacher={pair['teacher']}", f"data.source={GSM8K}", "data.num_train=1000",
               "data.num_test=100", f"out_dir={tmp_path / 'run'}", "device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 2, result.stdout[-3000:]
    for report in reports:
        assert report["dry_run"] == "ok" and report["ranks"] == 2 and report["decoder"] == "lean"
    assert not (tmp_path / "run").exists(), "a dry run writes nothing to out_dir"


def test_real_vocabulary_shapes_and_eos_merge(qwen_pairs):
    pair = qwen_pairs["qwen3_1.7b_from_8b"]
    student_tok, teacher_tok = load_tokenizer(str(pair["student"])), load_tokenizer(str(pair["teacher"]))
    student = load_causal_lm(str(pair["student"]), "cpu")
    teacher = load_causal_lm(str(pair["teacher"]), "cpu")
    assert student.get_output_embeddings().weight.shape[0] == QWEN3_PADDED_VOCAB
    assert student.config.tie_word_embeddings and not teacher.config.tie_word_embeddings  # as 1.7B and 8B
    space = vocab_space(student_tok, teacher_tok, student, teacher)
    assert (space.size, space.stop_ids, space.eos_id, space.pad_id) == (151_669, (151_643, 151_645), 151_643, 151_643)


def test_template_is_applied_identically_and_checked(qwen_pairs):
    pair = qwen_pairs["qwen3_1.7b_from_8b"]
    student_tok, teacher_tok = load_tokenizer(str(pair["student"])), load_tokenizer(str(pair["teacher"]))
    problems = load_problems(GSM8K)[:20]
    system = "Please reason step by step, and put your final answer within \\boxed{}."
    check_same_tokenization(student_tok, teacher_tok, problems, system)  # same files: passes
    prompt = student_tok.apply_chat_template([{"role": "system", "content": system},
                                              {"role": "user", "content": problems[0].question}],
                                             tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    # A teacher tokenizer with the same vocabulary but a different normalizer splits text differently.
    lowercase = qwen3_like_tokenizer("<|im_end|>")
    lowercase.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert lowercase.get_vocab() == teacher_tok.get_vocab()
    with pytest.raises(CompatibilityError, match="split the same prompt \\+ response differently"):
        check_same_tokenization(student_tok, lowercase, problems, system)


def test_special_token_mismatch_is_named(qwen_pairs):
    pair = qwen_pairs["qwen3_1.7b_from_8b"]
    student_tok = load_tokenizer(str(pair["student"]))
    other = qwen3_like_tokenizer("<|im_end|>")
    other.pad_token = "<|im_start|>"
    with pytest.raises(CompatibilityError, match="differ in pad_token: '<\\|endoftext\\|>' vs '<\\|im_start\\|>'"):
        vocab_space(student_tok, other)
