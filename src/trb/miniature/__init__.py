"""Make the miniature distillation pair: a strong teacher and a weak, undertrained "base" student.

The embedded default setting (METHOD.md: 8B -> 1.7B and 4B -> 0.6B teachers and students) is reproduced in
miniature: both models are small causal LMs of a standard Hugging Face architecture, trained here from scratch by
supervised fine-tuning (SFT) on worked solutions, with one tokenizer they share.

- The teacher is trained to high accuracy at temperature 1.0 (warmup + cosine lr, the full step budget).
- The student is a smaller model of the same family, trained on the same solutions with label smoothing: it learns
  the procedure, but it is under-confident, so at temperature 1.0 it samples a wrong token now and then, its rollouts
  derail and its pass@1 is low. This is the regime of the paper's base students: the capability is there, the
  sampled rollouts are poor, and distillation can move the student far. Its validation pass@1 is recorded every
  `eval_every` steps. With `student_early_stop` the student instead stops the first time its validation pass@1
  reaches `student_window` (a snapshot in the middle of training; slower to distill).
- `teacher_from` reuses the teacher and tokenizer of an earlier run (optionally training the teacher further:
  `teacher_more_steps`); `student_from` reuses an earlier student as well.

SFT feeds the models exactly as the rollout engine samples them: the prompt left-padded, the completion (solution +
EOS) right after it, position ids counted over real tokens from 0 (the sequence record of `trb.sequences`), and the
loss on the completion tokens only. The tokenizer's prompt format ends in a newline, an isolated token, so prompt
tokens + solution tokens are the tokens of the joined text.

    trb prepare arith --out src/trb/assets/miniature/arith     # the shipped checkpoints, preset "arith"
    trb prepare my_gsm8k.jsonl --out runs/pair --preset word    # a user's problems with worked solutions

The package: `config` (presets and what an output folder may hold, checked without torch), `sft` (batches, loss, the
SFT loop), `storage` (models on disk, a stopped run's stages), `pipeline` (`prepare` and its stages). The names
below are imported on first use, so that `trb prepare` checks its options and output folder before torch loads.
"""

from importlib import import_module

_EXPORTS = {  # name -> module; imported on first use, so that `trb.miniature.config` loads without torch
    **dict.fromkeys(("PRESETS", "SAVE_DTYPES", "ModelSize", "PrepareConfig", "PrepareError", "SFTConfig",
                     "finished_pair", "prepare_settings", "with_steps"), "trb.miniature.config"),
    **dict.fromkeys(("prepare", "split_problems"), "trb.miniature.pipeline"),
    **dict.fromkeys(("epoch_batches", "lr_factor", "sft_loss"), "trb.miniature.sft"),  # the loop: trb.miniature.sft.sft
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trb.miniature' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
