"""Pure math of TRB and on-policy distillation: torch only, scalars and tensors in, tensors out."""

from trb.core.blend import blend_logp, kl_divergence, realized_kl, solve_beta, trust_region
from trb.core.chunked import chunked_divergence
from trb.core.fused import reverse_kl_with_grad
from trb.core.divergences import (
    entropy,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    sampled_reverse_kl,
    topk_reverse_kl,
    topk_student_weighted_kl,
)
from trb.core.reduce import token_mean
from trb.core.sampling import keyed_exponential, keyed_sample, keyed_uniform, sample, with_temperature
from trb.core.seeds import step_prompts, stream_seed
from trb.core.schedules import constant, cosine_anneal, linear_anneal, linear_ramp
from trb.core.vocab import merged_logp

__all__ = [
    "blend_logp",
    "chunked_divergence",
    "constant",
    "cosine_anneal",
    "entropy",
    "forward_kl",
    "generalized_jsd",
    "keyed_exponential",
    "keyed_sample",
    "keyed_uniform",
    "kl_divergence",
    "linear_anneal",
    "linear_ramp",
    "merged_logp",
    "realized_kl",
    "reverse_kl",
    "reverse_kl_with_grad",
    "sample",
    "sampled_reverse_kl",
    "solve_beta",
    "step_prompts",
    "stream_seed",
    "token_mean",
    "trust_region",
    "topk_reverse_kl",
    "topk_student_weighted_kl",
    "with_temperature",
]
