"""TRB inside TRL's `DistillationTrainer`: TRL's loop, loss, config and logging, with the on-policy rollouts sampled
from a `trb` behavior policy.

TRL's trainer samples completions from the student and trains it towards the teacher with its generalized JSD
(`beta = 1`: reverse KL) at `temperature`. `TRBDistillationTrainer` changes only where those completions come from:
`_generate_single_turn`, the trainer's generation seam, decodes with trb's own engine (`trb.rollout`), student and
teacher in lock-step, from the behavior policy of a `trb` method at TRL's optimizer step (`state.global_step`), e.g. TRB's
blend with its annealed budget eps_k. The loss needs no importance weights (METHOD.md section 1), so nothing else
changes. After the warmup (eps_k = 0) the rollouts are the student's, as in the plain trainer.

Temperature: the policy acts on the student's and teacher's distributions at TRL's `temperature`, the ones the
trainer samples from and compares in its loss; eps = 0 therefore samples exactly the plain trainer's distribution.

With `use_vllm=True` (TRL's own argument, with its `vllm_gpu_memory_utilization`, `vllm_max_model_length` and
`vllm_enable_sleep_mode`; `vllm_mode="colocate"` only) the completions come from trb's vLLM engine
(`trb.vllm.rollouts`), one per rank, in every phase: the blend model while the policy reads the teacher, the student
alone after the warmup and in evaluation. TRL's own vLLM generation is not used for the student phase: vLLM runs
one engine per process (its parallel state is global), so TRL's engine and the blend engine cannot live side by side,
and TRL's weight sync (`load_weights` into the running model) fails on vLLM's CPU build, which repacks its weights
after loading. The engine is built from the models' folders (`name_or_path`) and takes the student's weights at the
first generation of every new optimizer step.

Logged per generation through TRL's metrics (averaged over each logging window): `trb/beta` and `trb/realized_kl`
(means over completion tokens of the blend weight and of KL(mu || pi_S), the budget spent), `trb/teacher_tokens`
(share of tokens drawn from the teacher: SKD injections, mixture draws) and the method's scheduled values
(`trb/eps`, ...). Evaluation rollouts come from the student, like the plain trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

try:
    from trl import DistillationConfig, DistillationTrainer
    from trl.extras.profiling import profiling_context
    from trl.models.utils import unwrap_model_for_generation
except ImportError as error:
    raise ImportError(
        "trb.integrations.trl needs TRL's DistillationTrainer; install it with: pip install 'trb[trl]'"
    ) from error

from trb.core import stream_seed, with_temperature
from trb.methods import METHODS, Method
from trb.models import vocab_space
from trb.rollout import BehaviorPolicy, Draws, Rollout, StudentPolicy, own_engine

__all__ = [
    "FixedBehavior", "TRBDistillationTrainer", "TemperedPolicy", "resolve_method", "sampler_methods", "sampling_only",
]

# The hooks of a method that reach beyond the rollouts, into what TRL's trainer owns (GKD: the data and the divergence;
# Veto: the target; MiniLLM: per-token loss weights; SFT warmup: a phase before training; adaptive TRB: a budget fed
# by the loop's teacher-KL). A method that overrides any of them would silently train something else here.
TRAINER_HOOKS = ("use_data", "target", "token_weights", "loss_spec", "observe", "before_training")


def sampling_only(method: Method | type[Method]) -> bool:
    """Whether a method (or method class) changes nothing but where the prefixes come from: its behavior policy and
    schedule, none of TRAINER_HOOKS."""
    cls = method if isinstance(method, type) else type(method)
    return all(getattr(cls, hook) is getattr(Method, hook) for hook in TRAINER_HOOKS)


def sampler_methods() -> list[str]:
    """The registered methods that run inside TRL's trainer."""
    return sorted(name for name, cls in METHODS.items() if sampling_only(cls))


@dataclass(frozen=True)
class FixedBehavior(Method):
    """One behavior policy at every step (e.g. `MixturePolicy(0.2)`: mixture sampling without MiniLLM's weights)."""

    name: ClassVar[str] = "fixed_behavior"
    policy: BehaviorPolicy

    def behavior(self, step: int, state: dict) -> BehaviorPolicy:
        return self.policy


@dataclass(frozen=True)
class TemperedPolicy:
    """`policy` applied to the student's and teacher's distributions at temperature tau: log softmax(logp / tau)."""

    policy: BehaviorPolicy
    temperature: float
    speculative: bool = False  # speculative decoding drafts and verifies at temperature 1

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def needs_student(self) -> bool:
        return self.policy.needs_student

    @property
    def needs_teacher(self) -> bool:
        return self.policy.needs_teacher

    def _tempered(self, logp: torch.Tensor | None) -> torch.Tensor | None:
        return None if logp is None else with_temperature(logp, self.temperature)  # (B, V)

    def distribution(self, student_logp, teacher_logp):
        return self.policy.distribution(self._tempered(student_logp), self._tempered(teacher_logp))

    def choose(self, student_logp, teacher_logp, draws: Draws):
        return self.policy.choose(self._tempered(student_logp), self._tempered(teacher_logp), draws)


def resolve_method(method: Method | BehaviorPolicy | str, params: dict | None) -> Method:
    """A method object, a method name with its parameters, or a behavior policy used at every step."""
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; one of {sorted(METHODS)}")
        method = METHODS[method](**(params or {}))
    elif params:
        raise ValueError("method_params go with a method name, e.g. method='trb', method_params={'eps0': 0.02}")
    elif not isinstance(method, Method):
        return FixedBehavior(method)
    if not sampling_only(method):
        raise ValueError(
            f"method {method.name!r} changes the loss, the target or the data, which TRL's DistillationTrainer owns; "
            f"run it with `trb train`. Here: {', '.join(sampler_methods())}, or a behavior policy for every step"
        )
    return method


def _check_args(args: DistillationConfig, tools: list, use_vllm: bool) -> None:
    if use_vllm:
        vllm_unsupported = {
            f"vllm_mode={args.vllm_mode!r} (only 'colocate')": args.vllm_mode != "colocate",
            "vllm_tensor_parallel_size > 1": args.vllm_tensor_parallel_size != 1,
            "temperature != 1": args.temperature != 1.0,
        }
        named = [name for name, set_ in vllm_unsupported.items() if set_]
        if named:
            raise ValueError(f"TRBDistillationTrainer with use_vllm=True samples with trb's vLLM engine (one per "
                             f"rank, the policy's distribution at temperature 1), which does not support "
                             f"{', '.join(named)}")
    unsupported = {
        "tools": bool(tools),
        "top_p != 1": args.top_p != 1.0,
        "top_k > 0": bool(args.top_k),
        "min_p": args.min_p is not None,
        "repetition_penalty != 1": args.repetition_penalty != 1.0,
        "generation_kwargs": bool(args.generation_kwargs),
        "max_completion_length=None": args.max_completion_length is None,
    }
    named = [name for name, set_ in unsupported.items() if set_]
    if named:
        raise ValueError(
            f"TRBDistillationTrainer samples with trb's engine, which does not support {', '.join(named)}; the "
            "behavior policy sees the full distributions at `temperature`"
        )


class TRBDistillationTrainer(DistillationTrainer):
    """TRL's `DistillationTrainer` whose on-policy completions come from a `trb` method's behavior policy.

    method: a `trb.methods` object (`TRB(eps0=0.02, horizon=50)`), a name with `method_params`
    (`method="trb", method_params={"eps0": 0.02}`), or a behavior policy used at every step (`MixturePolicy(0.2)`).
    Everything else is `DistillationTrainer`'s; `args.use_vllm` selects trb's vLLM engine (module docstring), and
    vllm_settings (a `trb.vllm.engine.VLLMSettings`), if given, replaces the settings built from TRL's vLLM arguments
    (e.g. to fix `kv_cache_bytes` on vLLM's CPU build). `last_rollout` holds the `trb.rollout.Rollout` record of the latest
    generation (tokens, behavior / student / teacher log-probs, beta and realized KL per token).
    """

    _tag_names = ["trl", "distillation", "trb"]

    def __init__(
        self,
        model,
        teacher_model,
        args: DistillationConfig | None = None,
        *,
        method: Method | BehaviorPolicy | str = "trb",
        method_params: dict | None = None,
        vllm_settings=None,
        **kwargs,
    ):
        if teacher_model is None:
            raise ValueError("TRBDistillationTrainer needs a teacher_model: the teacher decodes beside the student")
        self.method = resolve_method(method, method_params)
        use_vllm = args is not None and args.use_vllm
        if use_vllm:  # TRL does not build its own vLLM generation: trb's engine samples every phase
            args.use_vllm = False
        try:
            super().__init__(model, teacher_model, args, **kwargs)
        finally:
            if use_vllm:
                args.use_vllm = True
        _check_args(self.args, self.tools, use_vllm)
        if self._is_vlm:
            raise ValueError("TRBDistillationTrainer supports text models only (the processing class is a processor)")
        student = self.accelerator.unwrap_model(self.model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        self.vocab = vocab_space(self._tokenizer, None, student, teacher)
        self.method_state: dict = {}
        self.last_rollout: Rollout | None = None
        self._calls = (None, 0)  # ((mode, step), generations so far at it): distinct keys for each eval batch
        self.engine = self._engine(student, teacher, vllm_settings) if use_vllm else None
        self._synced_step = self.state.global_step  # the step whose student weights the vLLM engine holds

    def _engine(self, student, teacher, settings):
        """trb's vLLM engine over the pair's folders (the models' name_or_path), with TRL's vLLM arguments."""
        from trb.vllm.engine import VLLMSettings
        from trb.vllm.rollouts import VLLMRollouts

        a = self.args
        settings = settings or VLLMSettings(gpu_memory_utilization=a.vllm_gpu_memory_utilization,
                                            max_model_len=a.vllm_max_model_length or 0,
                                            sleep=a.vllm_enable_sleep_mode)
        return VLLMRollouts(student.name_or_path, teacher.name_or_path, self.vocab, settings, student, seed=a.seed)

    def _policy(self, mode: str) -> BehaviorPolicy:
        step = self.state.global_step
        policy = self.method.behavior(step, self.method_state) if mode == "train" else StudentPolicy()
        return policy if self.temperature == 1.0 else TemperedPolicy(policy, self.temperature)

    def _keys(self, mode: str, count: int) -> torch.Tensor:
        """Sequence i's random key from (seed, mode, step, rank, call, i): the rollouts of a step are the same after a
        resume and differ across ranks and evaluation batches."""
        at = (mode, self.state.global_step)
        call = self._calls[1] if self._calls[0] == at else 0
        self._calls = (at, call + 1)
        rank = self.accelerator.process_index
        return torch.tensor([stream_seed(self.args.seed, *at, rank, call, i, "rollout") & 0xFFFFFFFF
                             for i in range(count)])  # (B,)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        mode = "train" if self.model.training else "eval"
        policy = self._policy(mode)
        keys = self._keys(mode, len(prompt_ids))  # (B,)
        with (
            profiling_context(self, "trb.generate"),
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as student,
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            was_training = student.training
            student.eval()
            teacher = self.accelerator.unwrap_model(self.teacher_model).eval()
            engine = self.engine or own_engine(student, teacher, self.vocab, record_kl=False)  # TRL's loss has them
            if self.engine is not None and self._synced_step != self.state.global_step:
                self.engine.update_student(student)  # vLLM's copy takes the weights of the steps since
                self._synced_step = self.state.global_step
            rollout = engine.rollout(policy, [list(p) for p in prompt_ids], self.max_completion_length, keys)
            student.train(was_training)
        self.last_rollout = rollout
        self._log_rollout(mode, rollout)
        ids, mask = rollout.completion_ids.cpu(), rollout.completion_mask.cpu()  # (B, T)
        return [row[row_mask].tolist() for row, row_mask in zip(ids, mask, strict=True)]

    def _log_rollout(self, mode: str, rollout: Rollout) -> None:
        """Token means of beta, realized KL and teacher draws over all ranks, and the method's scheduled values."""
        mask = rollout.completion_mask.float()  # (B, T)
        per_token = torch.stack([rollout.beta, rollout.realized_kl, rollout.from_teacher.float()])  # (3, B, T)
        sums = torch.cat([(per_token * mask).sum((1, 2)), mask.sum()[None]])  # (4,)
        sums = self.accelerator.gather(sums.to(self.accelerator.device)).view(-1, 4).sum(0)  # (4,)
        beta, kl, teacher_tokens = (sums[:3] / sums[3].clamp_min(1)).tolist()
        metrics = self._metrics[mode]
        metrics["trb/beta"].append(beta)
        metrics["trb/realized_kl"].append(kl)
        metrics["trb/teacher_tokens"].append(teacher_tokens)
        if mode == "train":
            for name, value in self.method.schedule_metrics(self.state.global_step, self.method_state).items():
                metrics[f"trb/{name}"].append(value)
