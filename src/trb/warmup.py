"""The SFT-warmup baseline's first phase (METHOD.md section 3), run by `SFTWarmup.before_training` before OPD starts:
teacher samples for the prompts of the first steps, then a few AdamW updates of the student on them."""

from __future__ import annotations

from typing import Callable

import torch

from trb import distributed
from trb.core import step_prompts, stream_seed
from trb.losses import sft_loss
from trb.rollout.policies import TeacherPolicy
from trb.sequences import rollout_from_tokens


def sft_warmup(t, updates: int, prompt_steps: int, samples_per_prompt: int, write: Callable[[int, dict], None],
               log: Callable[[str], None]) -> None:
    """`samples_per_prompt` teacher samples for the prompts of the first `prompt_steps` steps, then `updates` AdamW
    updates of token-mean cross-entropy on them (a fresh optimizer). t: the run's `trb.trainer.Trainer`;
    write(step, values) logs a metrics line."""
    cfg, s = t.cfg, t.s
    indices = [i for step in range(prompt_steps)
               for i in step_prompts(step, cfg.prompts_per_step, len(s.prompts), cfg.seed)]
    samples = t.decode(-1, TeacherPolicy(), [s.prompts[i] for i in indices for _ in range(samples_per_prompt)])
    pairs = [(r.prompt_ids[row][r.prompt_mask[row]].tolist(), r.completion_ids[row][r.completion_mask[row]].tolist())
             for r in samples for row in range(len(r.stopped))]  # this rank's (prompt, teacher response) pairs
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(stream_seed(cfg.seed, "sft"))).tolist()
    params = [p for p in s.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    s.student.train()
    for update in range(updates):
        chosen = [pairs[j] for j in order[update::updates]]
        num_tokens = distributed.all_reduce_sum(sum(len(r) for _, r in chosen), s.world, s.device)
        micro = [rollout_from_tokens([p for p, _ in chosen[i : i + cfg.micro_batch]],
                                     [r for _, r in chosen[i : i + cfg.micro_batch]], s.vocab, s.device)
                 for i in range(0, len(chosen), cfg.micro_batch)]
        optimizer.zero_grad(set_to_none=True)
        total = [0.0]

        def loss_fn(m):
            loss = sft_loss(s.student, m, s.vocab, m.completion_mask.float() / max(num_tokens, 1),
                            cfg.loss.chunk_size, hidden_fn=t.hidden)
            total[0] += loss.item()
            return loss

        t.backward(micro, loss_fn)
        distributed.clip_grad_norm(params, cfg.grad_clip)
        optimizer.step()
        write(0, {"sft/update": update + 1, "sft/loss": distributed.all_reduce_sum(total[0], s.world, s.device)})
    t.refresh()
    log(f"SFT warmup: {updates} updates on {len(pairs) * s.world.size} teacher samples")
