"""The "chain" setting (6-10 dependent steps) and its `trb prepare` preset: every line depends on the previous result,
the preset's token budget holds the longest solution, its student is weaker than the shipped miniatures', and
`trb prepare chain` runs end to end."""

import json
import re
from dataclasses import replace

from trb.miniature import PRESETS, ModelSize, SFTConfig, prepare
from trb.tasks import SETTINGS, train_tokenizer
from trb.tasks.tokenizer import PROMPT_FORMAT

LINE = re.compile(r"([b-k]) = (\d+) ([-+*]) (\d+) = (\d+)")


def parameters(size) -> int:
    head = size.hidden // size.heads
    attention = size.hidden * head * (2 * size.heads + 2 * size.kv_heads)
    return size.layers * (attention + 3 * size.hidden * size.intermediate)


def test_every_step_uses_the_previous_result():
    lengths = set()
    for p in SETTINGS["chain"]("test", 500, seed=3):
        *lines, boxed = p.solution.split("\n")
        lengths.add(len(lines))
        value = int(re.match(r"a = (\d+),", p.question).group(1))
        for k, line in enumerate(lines):
            var, x, op, y, result = LINE.fullmatch(line).groups()
            assert var == "bcdefghijk"[k] and int(x) == value, "each line starts from the previous result"
            value = {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op]
            assert int(result) == value and 0 <= value <= 999
        assert boxed == f"\\boxed{{{value}}}" and p.answer == str(value)
        assert p.question.endswith(f"Find {'bcdefghijk'[len(lines) - 1]}.")
    assert lengths == set(range(6, 11))


def test_preset_budget_holds_the_longest_solution_and_its_student_is_no_larger():
    preset = PRESETS["chain"]
    problems = SETTINGS["chain"]("train", 3000, seed=0)
    tokenizer = train_tokenizer([PROMPT_FORMAT.format(question=p.question) + p.solution for p in problems],
                                preset.vocab_size)
    longest = max(len(tokenizer(p.solution, add_special_tokens=False)["input_ids"]) for p in problems)
    assert longest + 1 <= preset.max_new_tokens, "solution + EOS within the rollout budget"
    assert preset.student_window[1] <= 0.08
    # The student is no larger than the other settings' students: its weakness comes from the chain's length.
    for other in ("arith", "word"):
        assert parameters(preset.student) <= parameters(PRESETS[other].student)
    assert parameters(preset.teacher) > 4 * parameters(preset.student)


def test_prepare_chain_end_to_end_on_tiny_models(tmp_path):
    tiny = replace(
        PRESETS["chain"], vocab_size=160, num_train=48, num_val=6, num_test=6,
        teacher=ModelSize(layers=1, hidden=32, heads=4, kv_heads=2, intermediate=64),
        student=ModelSize(layers=1, hidden=16, heads=2, kv_heads=1, intermediate=32),
        teacher_sft=SFTConfig(batch_size=8, steps=4, lr=3e-3, warmup=1, weight_decay=0.1, schedule="cosine"),
        student_sft=SFTConfig(batch_size=8, steps=4, lr=3e-3, warmup=1, weight_decay=0.1, schedule="cosine",
                              label_smoothing=0.1),
        eval_every=2, eval_samples=1, save_dtype="float32")
    report = prepare("chain", tmp_path, tiny, log=lambda message: None)
    assert report["source"] == "chain"
    assert json.loads((tmp_path / "prepare.json").read_text())["source"] == "chain"
    for role in ("teacher", "student"):
        assert (tmp_path / role / "model.safetensors").is_file()
        assert 0.0 <= report[role]["test"]["pass_at_1"] <= 1.0


def test_regime_config_matches_the_preset():
    from trb.config import load_config

    cfg = load_config("trb:configs/miniature_chain.yaml")
    assert cfg.models.student == "trb:miniature/chain/student"
    assert cfg.data.source == "chain" and cfg.data.val_count > 0
    assert cfg.max_new_tokens == PRESETS["chain"].max_new_tokens
    assert cfg.loss.divergence == "reverse_kl"
    assert (cfg.method.eps0, cfg.method.horizon) == (0.02, 50)
