"""trb: on-policy distillation of language models with Trust-Region behavior Blending.

The public API, imported on first use (`import trb` itself loads no torch):

    pair = trb.load_pair(student, teacher)                      # models, tokenizer, shared vocabulary
    rollout = trb.sample_rollouts(pair, trb.TRBPolicy(eps), prompts, max_new_tokens, generator)
    loss, per_token, diagnostics = trb.distill_loss(pair.student, pair.teacher, rollout, pair.vocab, spec, weight)
    trb.distill("trb:configs/miniature_arith.yaml", ["steps=100"])   # the `trb train` loop

Add a method with `@trb.register_method` (a frozen dataclass subclass of `trb.Method`) and a divergence with
`trb.register_divergence(name, fn)`; both are then selectable by name in any config.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "trb.api": ("Pair", "distill", "load_pair", "sample_rollouts"),
    "trb.config": ("TrainConfig", "load_config"),
    "trb.methods": ("METHODS", "Method", "register_method"),
    "trb.divergences": ("DIVERGENCES", "Divergence", "LossSpec", "Sampled", "register_divergence"),
    "trb.losses": ("distill_loss",),
    "trb.rollout": ("BehaviorPolicy", "Choice", "Draws", "MixturePolicy", "Rollout", "SKDPolicy", "StudentPolicy",
                    "TRBPolicy", "TeacherPolicy", "generate"),
    "trb.core": ("blend_logp", "constant", "cosine_anneal", "kl_divergence", "linear_anneal", "linear_ramp",
                 "solve_beta"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'trb' has no attribute {name!r}")
    value = getattr(import_module(_HOME[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
