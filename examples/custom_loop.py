"""A training loop of your own on the trb API: TRB rollouts whose trust region eps is annealed to 0, the exact OPD
loss (reverse KL on the full vocabulary), AdamW. The shipped arith miniature, no downloads.

    python examples/custom_loop.py            # 40 steps of 16 prompts (minutes on a laptop CPU)
    python examples/custom_loop.py --quick    # 3 steps of 8 prompts
"""

import argparse
import json
from pathlib import Path

import torch

import trb
from trb.tasks import SETTINGS, is_correct

parser = argparse.ArgumentParser(description="A custom TRB training loop on the arith miniature.")
parser.add_argument("--quick", action="store_true", help="3 steps of 8 prompts")
parser.add_argument("--out", default="runs/custom_loop", help="folder for curve.json (one record per step)")
args = parser.parse_args()
steps, prompts_per_step = (3, 8) if args.quick else (40, 16)
eps0, horizon = 0.02, max(steps // 2, 2)  # METHOD.md section 2: eps_k = eps0 (1 - k / horizon), then 0

pair = trb.load_pair("trb:miniature/arith/student", "trb:miniature/arith/teacher")
problems = SETTINGS["arith"]("train", steps * prompts_per_step, 0)
optimizer = torch.optim.AdamW(pair.student.parameters(), lr=3e-4, weight_decay=0.0)
spec = trb.LossSpec(divergence="reverse_kl")
curve = []
for step in range(steps):
    batch = problems[step * prompts_per_step : (step + 1) * prompts_per_step]
    eps = trb.linear_anneal(step, eps0, horizon)
    policy = trb.TRBPolicy(eps) if eps > 0 else trb.StudentPolicy()  # after the warmup: plain on-policy rollouts
    rollout = trb.sample_rollouts(pair, policy, [p.question for p in batch], 96, torch.Generator().manual_seed(step))
    mask = rollout.completion_mask  # (B, T)
    weight = mask.float() / mask.sum()  # (B, T): the mean over the batch's completion tokens
    loss, per_token, _ = trb.distill_loss(pair.student, pair.teacher, rollout, pair.vocab, spec, weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(pair.student.parameters(), 1.0)
    optimizer.step()

    texts = pair.tokenizer.batch_decode(torch.where(mask, rollout.completion_ids, pair.vocab.pad_id),
                                        skip_special_tokens=True)
    record = {
        "step": step,
        "eps": eps,
        "loss": loss.item(),
        "mean_beta": (rollout.beta[mask].mean().item()),
        "rollout_pass_rate": sum(is_correct(t, p.answer) for t, p in zip(texts, batch)) / len(batch),
    }
    curve.append(record)
    print(f"step {step}: eps {eps:.4f}  loss {record['loss']:.4f}  mean beta {record['mean_beta']:.3f}  "
          f"rollout pass rate {record['rollout_pass_rate']:.2f}")

out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
(out / "curve.json").write_text(json.dumps(curve, indent=1))
print(f"final loss {curve[-1]['loss']:.4f} after {steps} steps; curve in {out / 'curve.json'}")
