"""The divergence table the loss looks `loss.divergence` up in, and the loss's own config (`LossSpec`).

Each entry is a small per-token function of log-probabilities (the math is `trb.core.divergences`), plus what of the
teacher it reads, which decides whether the loss can use the teacher log-probs recorded while decoding instead of a
second teacher pass. A new divergence is one call:

    def skew_kl(student_logp, target_logp, spec, sampled):   # (n, m) x 2 -> (n,)
        ...
    register_divergence("skew_kl", skew_kl)

after which `loss.divergence=skew_kl` selects it in any config. This module imports no torch (the built-in entries
import `trb.core` when first called), so a config is checked in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

if TYPE_CHECKING:
    import torch

READS = ("vocab", "student_topk", "sampled_token")


class Sampled(NamedTuple):
    """The tokens the rollout sampled at the n positions of a chunk: index (n, 1) int64, where each sits on the last
    axis of the log-prob tensors given with it (so `logp.gather(-1, sampled.index)` reads it), and behavior_logp (n,),
    log mu(y) under the behavior policy that sampled it."""

    index: torch.Tensor
    behavior_logp: torch.Tensor


# fn(student_logp (n, m), target_logp (n, m), spec, sampled) -> (n,): m is the vocabulary, or the support a
# divergence reads when the loss evaluates it on recorded log-probs (see Divergence.reads).
PerToken = Callable[["torch.Tensor", "torch.Tensor", "LossSpec", "Sampled | None"], "torch.Tensor"]


@dataclass(frozen=True)
class Divergence:
    """A per-token divergence of the student from the target.

    fn: the per-token value (its gradient is the loss's); the student side carries the gradient, the target is the
    teacher's distribution (or a method's transform of it) and must be treated as a constant.
    reads: what of the target fn depends on, which lets the loss reuse the teacher log-probs recorded while decoding:
      "vocab": the whole vocabulary (always a teacher pass);
      "student_topk": only the student's `spec.top_k` most probable tokens: with records, fn gets both sides on the
        recorded top-k ids (n, k), in the student's descending order, and sampled=None; it must then give the value
        it gives on the full vocabulary;
      "sampled_token": only the sampled token: with records, fn gets (n, 1) log-probs and sampled.index all 0.
    logit_grad: optional closed form of value and logit gradient in one pass, without autograd, used when the target
    is the teacher itself: (student_logits (n, V'), teacher_logits (n, V'), weight (n,), vocab_size, stop_ids) ->
    (value (n,), gradient of sum(weight * value) w.r.t. student_logits, teacher entropy (n,)).
    """

    name: str
    fn: PerToken
    reads: str = "vocab"
    logit_grad: Callable[..., Any] | None = None

    def __post_init__(self):
        if self.reads not in READS:
            raise ValueError(f"divergence {self.name!r}: reads must be one of {', '.join(READS)}, got {self.reads!r}")


DIVERGENCES: dict[str, Divergence] = {}
"""Every registered divergence by name (`loss.divergence` in a config): the built-ins and those added with
`register_divergence`."""


def register_divergence(name: str, fn: PerToken, reads: str = "vocab",
                        logit_grad: Callable[..., Any] | None = None) -> Divergence:
    """Make `fn` available as `loss.divergence=name` (see `Divergence` for the arguments); returns the entry.
    Registering a name twice is an error, so a typo cannot silently replace a built-in."""
    if name in DIVERGENCES:
        raise ValueError(f"divergence {name!r} is already registered")
    entry = Divergence(name, fn, reads, logit_grad)
    DIVERGENCES[name] = entry
    return entry


@dataclass(frozen=True)
class LossSpec:
    """The loss of a run (config section `loss`): which divergence (a name in DIVERGENCES), its parameters (top_k for
    the top-k forms, jsd_beta for "jsd"), and how it is computed (chunks, reuse of decode records, length groups,
    compilation); none of the latter changes its value."""

    divergence: str = "reverse_kl"
    top_k: int = 16
    jsd_beta: float = 0.5
    chunk_size: int = 1024
    reuse_teacher: bool = True  # take teacher log-probs recorded while decoding where they suffice (distill_loss)
    length_groups: int = 8  # training forwards run rows in this many groups of similar length (less padding)
    # torch.compile the training forwards (final hidden states, dynamic shapes) and the closed-form reverse KL; pays
    # one compilation per model and grad mode, in the first training step
    compile: bool = False

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; choose one of {', '.join(DIVERGENCES)}")
        if self.length_groups < 1:
            raise ValueError(f"length_groups must be >= 1, got {self.length_groups}")
        if self.top_k < 1:  # the upper bound, the vocabulary, is checked once the models are loaded
            raise ValueError(f"top_k must be >= 1, got {self.top_k}; the smallest valid value is 1")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (tokens per loss chunk), got {self.chunk_size}; try 1024")

    @property
    def entry(self) -> Divergence:
        """The table entry of `divergence`."""
        return DIVERGENCES[self.divergence]

    @property
    def recorded(self) -> str | None:
        """What of the teacher the decoder records for this loss to take instead of a teacher pass: the divergence's
        support ("sampled_token", or "student_topk" on the student's top_k) with reuse_teacher; None when the loss
        runs the teacher (a divergence that reads the whole vocabulary, or reuse_teacher off)."""
        reads = self.entry.reads
        return reads if self.reuse_teacher and reads != "vocab" else None

    @property
    def record_topk(self) -> int:
        """k of the student's top-k on which the decoder records the teacher's log-probs for this loss (0: none)."""
        return self.top_k if self.recorded == "student_topk" else 0


# ------------------------------------------------------------------------------------------------------------------
# The built-in divergences (METHOD.md section 1). Each imports trb.core on its first call, not at import.


def _reverse_kl(student_logp, target_logp, spec, sampled):
    """KL(pi_S || target) on the full vocabulary: the exact OPD loss."""
    from trb.core import reverse_kl

    return reverse_kl(student_logp, target_logp)


def _reverse_kl_logit_grad(student_logits, teacher_logits, weight, vocab_size, stop_ids):
    from trb.core import reverse_kl_with_grad

    return reverse_kl_with_grad(student_logits, teacher_logits, weight, vocab_size, stop_ids)


def _topk_student_weighted_kl(student_logp, target_logp, spec, sampled):
    """The paper's estimator (top-k OPD): full-vocabulary log-probs on the student's top-k, weights held constant."""
    from trb.core import topk_student_weighted_kl

    return topk_student_weighted_kl(student_logp, target_logp, spec.top_k)


def _topk_reverse_kl(student_logp, target_logp, spec, sampled):
    """KL between student and target both renormalized over the student's top-k."""
    from trb.core import topk_reverse_kl

    return topk_reverse_kl(student_logp, target_logp, spec.top_k)


def _sampled_reverse_kl(student_logp, target_logp, spec, sampled):
    """The sampled-token estimator in policy-gradient form, importance weighted under a non-student behavior."""
    from trb.core import sampled_reverse_kl

    student_token = student_logp.gather(-1, sampled.index)[:, 0]  # (n,)
    return sampled_reverse_kl(student_token, target_logp.gather(-1, sampled.index)[:, 0], sampled.behavior_logp)


def _forward_kl(student_logp, target_logp, spec, sampled):
    """KL(target || pi_S)."""
    from trb.core import forward_kl

    return forward_kl(student_logp, target_logp)


def _jsd(student_logp, target_logp, spec, sampled):
    """Generalized JSD(spec.jsd_beta), TRL's convention (0: forward KL, 1: reverse KL)."""
    from trb.core import generalized_jsd

    return generalized_jsd(student_logp, target_logp, spec.jsd_beta)


register_divergence("reverse_kl", _reverse_kl, logit_grad=_reverse_kl_logit_grad)
register_divergence("topk_student_weighted_kl", _topk_student_weighted_kl, reads="student_topk")
register_divergence("topk_reverse_kl", _topk_reverse_kl, reads="student_topk")
register_divergence("sampled_reverse_kl", _sampled_reverse_kl, reads="sampled_token")
register_divergence("forward_kl", _forward_kl)
register_divergence("jsd", _jsd)
