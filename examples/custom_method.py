"""A behavior policy, a method and a divergence of your own, registered in a few lines and trained with the loop of
`trb train` (checkpoints, evaluations, report) through `trb.distill`, selected by name as any built-in would be.

- GeometricPolicy samples every token from the geometric mean mu ∝ pi_S^(1 - beta) pi_T^beta: TRB's path at a
  fixed beta, without a trust region.
- GeometricWarmup is the method: that policy for the first `horizon` steps, then the student.
- skew_reverse_kl is the divergence: KL(pi_S || a pi_S + (1 - a) target), a = 0.1, the mixture held constant.

    python examples/custom_method.py            # 20 steps on the arith miniature
    python examples/custom_method.py --quick    # 2 small steps
"""

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

import trb
from trb.core import reverse_kl


@dataclass(frozen=True)
class GeometricPolicy:
    beta: float
    name: str = "geometric"
    needs_student: bool = True
    needs_teacher: bool = True
    speculative: bool = False

    def choose(self, student_logp, teacher_logp, draws) -> trb.Choice:
        beta = torch.full(student_logp.shape[:1], self.beta, device=student_logp.device)  # (B,)
        mu = trb.blend_logp(student_logp, teacher_logp, beta)  # (B, V)
        token = draws.token(mu)  # (B,)
        return trb.Choice(token, mu.gather(-1, token[:, None])[:, 0], beta, trb.kl_divergence(mu, student_logp),
                          from_teacher=torch.zeros_like(token, dtype=torch.bool))


@trb.register_method
@dataclass(frozen=True)
class GeometricWarmup(trb.Method):
    name: ClassVar[str] = "geometric_warmup"
    beta: float = 0.3
    horizon: int = 10

    def behavior(self, step: int, state: dict):
        return GeometricPolicy(self.beta) if step < self.horizon else trb.StudentPolicy()

    def schedule_metrics(self, step: int, state: dict) -> dict[str, float]:
        return {"beta": self.beta if step < self.horizon else 0.0}


def skew_reverse_kl(student_logp, target_logp, spec, sampled, skew=0.1):
    """KL(pi_S || skew pi_S + (1 - skew) target) at each position, (n, V) x 2 -> (n,)."""
    mixture = torch.logaddexp(student_logp + math.log(skew), target_logp + math.log1p(-skew))  # (n, V)
    return reverse_kl(student_logp, mixture)  # the target side (the mixture) is held constant


trb.register_divergence("skew_reverse_kl", skew_reverse_kl)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train with a registered method and divergence.")
    parser.add_argument("--quick", action="store_true", help="2 steps of 4 prompts x 2 rollouts, 8 test problems")
    parser.add_argument("--out", default="runs/custom_method", help="the run folder's parent")
    args = parser.parse_args()
    overrides = ["method.name=geometric_warmup", "method.beta=0.3", "loss.divergence=skew_reverse_kl",
                 f"out_dir={Path(args.out) / 'run'}", "steps=20", "eval_every=10"]
    if args.quick:
        overrides += ["steps=2", "method.horizon=1", "prompts_per_step=4", "rollouts_per_prompt=2", "data.num_train=64",
                      "data.num_test=8", "data.num_val=0", "eval_samples=1", "checkpoint_every=0",
                      "log_rollouts_every=0"]
    summary = trb.distill("trb:configs/miniature_arith.yaml", overrides)
    print(json.dumps({"status": summary["status"], "run": summary["run"], **summary["final"]}))
