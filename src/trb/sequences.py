"""The data contract between decoding, the loss, evaluation and the miniature's SFT: the sequence record (`Rollout`:
a batch of prompt + completion sequences with their per-token records) and the padding rules that tie sampled inputs
to the training forward (prompts left-padded, completions right-padded, positions counted over attended tokens)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from trb.models import VocabSpace


@dataclass
class Rollout:
    """A batch of finished rollouts. B sequences, prompts left-padded to P, completions right-padded to T.

    completion_mask is 1 for sampled tokens up to and including the stop token. Per-token records (B, T) are
    zero/False at masked positions. student_logp / teacher_logp are the temperature-1 log-probabilities of the
    sampled token on the shared vocabulary (None when that model did not run). stopped: True where the sequence
    ended with EOS, False where it hit max_new_tokens.
    """

    prompt_ids: torch.Tensor  # (B, P) int64
    prompt_mask: torch.Tensor  # (B, P) bool
    completion_ids: torch.Tensor  # (B, T) int64
    completion_mask: torch.Tensor  # (B, T) bool
    behavior_logp: torch.Tensor  # (B, T)
    student_logp: torch.Tensor | None  # (B, T)
    teacher_logp: torch.Tensor | None  # (B, T)
    beta: torch.Tensor  # (B, T)
    realized_kl: torch.Tensor  # (B, T)
    from_teacher: torch.Tensor  # (B, T) bool
    stopped: torch.Tensor  # (B,) bool
    # With record_topk = k and both models decoding: the student's top-k token ids at each position and the
    # teacher's log-probs there, so a top-k loss can skip the second teacher pass.
    topk_ids: torch.Tensor | None = None  # (B, T, k) int64
    teacher_topk_logp: torch.Tensor | None = None  # (B, T, k)
    # Full-vocabulary diagnostics at each prefix, recorded while decoding: KL(pi_S || pi_T) when both models ran,
    # H(pi_T) when the teacher ran.
    teacher_kl: torch.Tensor | None = None  # (B, T)
    teacher_entropy: torch.Tensor | None = None  # (B, T)

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)  # (B,)

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask and position_ids (B, P + T) of prompt + completion, for a training forward."""
        input_ids = torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # (B, P + T)
        attention_mask = torch.cat([self.prompt_mask, self.completion_mask], dim=1)  # (B, P + T)
        return input_ids, attention_mask, position_ids(attention_mask)

    def to(self, device: torch.device) -> Rollout:
        return Rollout(**{f.name: _move(getattr(self, f.name), device) for f in fields(self)})

    def select(self, rows: torch.Tensor | slice) -> Rollout:
        return Rollout(**{f.name: _index(getattr(self, f.name), rows) for f in fields(self)})


def _move(x, device):
    return None if x is None else x.to(device)


def _index(x, rows):
    return None if x is None else x[rows]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over attended tokens only, (B, L); padded slots get 0 (they are never attended)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged prompts -> (ids, mask), each (B, P), padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = True
    return ids.to(device), mask.to(device)


def rollout_from_tokens(
    prompts: list[list[int]], completions: list[list[int]], vocab: VocabSpace, device: torch.device
) -> Rollout:
    """A Rollout record of given prompt and completion tokens (dataset solutions, fixed data for GKD): prompts
    left-padded, completions right-padded, per-token records zero. A completion ending in EOS counts as stopped."""
    prompt_ids, prompt_mask = left_pad(prompts, vocab.pad_id, device)  # (B, P)
    width = max(1, max(len(c) for c in completions))
    completion_ids = torch.full((len(completions), width), vocab.pad_id, dtype=torch.long)  # (B, T)
    completion_mask = torch.zeros((len(completions), width), dtype=torch.bool)  # (B, T)
    for row, tokens in enumerate(completions):
        completion_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        completion_mask[row, : len(tokens)] = True
    zeros = torch.zeros((len(completions), width), device=device)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids.to(device),
        completion_mask=completion_mask.to(device),
        behavior_logp=zeros,
        student_logp=None,
        teacher_logp=None,
        beta=zeros,
        realized_kl=zeros,
        from_teacher=torch.zeros((len(completions), width), dtype=torch.bool, device=device),
        stopped=torch.tensor([len(c) > 0 and c[-1] == vocab.eos_id for c in completions], device=device),
    )
