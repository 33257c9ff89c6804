"""The blend model inside vLLM: one model class holding the student's and the teacher's stacks, whose
`compute_logits` returns the behavior policy's log mu, so vLLM's own sampler draws from mu.

vLLM builds it from the student's checkpoint folder with two config overrides (`hf_overrides`, set by
`trb.vllm.engine`): `architectures = ["TRBBlendForCausalLM"]` and `trb_blend`, which names the teacher's folder and
the shared token space (`trb.models.VocabSpace`). Each stack is vLLM's own model of its architecture, built from its
own config under its own model tag, so the two keep separate compiled graphs; their attention layers share vLLM's
KV cache (one block table per request). Without a teacher the class is the student alone, sliced and stop-merged the
same way: the engine's student phase.

What vLLM sees as the vocabulary is the shared real vocabulary V followed by `len(EXTRAS)` record columns: at each
prefix `compute_logits` returns (n, V + E), log mu on the first V columns and the prefix's records (beta, KL(mu ||
pi_S), and with a teacher KL(pi_S || pi_T) and H(pi_T)) on the last E. The engine samples with the record columns
disallowed (`allowed_token_ids`) and reads them back as raw logits (`logprobs_mode="raw_logits"`,
`logprob_token_ids`): the sampled token's returned value is then log mu(token), the behavior log-prob, and the
records come back with it, computed once, where the solver already computed them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from vllm.compilation.backends import set_model_tag
from vllm.config import VllmConfig
from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator
from vllm.model_executor.models.utils import init_vllm_registered_model
from vllm.transformers_utils.config import get_config

from trb.core import entropy, kl_divergence, merged_logp
from trb.rollout.policies import BehaviorPolicy, StudentPolicy
from trb.vllm.behavior import distribution

ARCHITECTURE = "TRBBlendForCausalLM"
EXTRAS = ("beta", "realized_kl", "teacher_kl", "teacher_entropy")  # the record columns after the vocabulary
STUDENT, TEACHER = "student", "teacher"  # the stacks' weight-name prefixes


def _stack(vllm_config: VllmConfig, folder: str, tag: str) -> nn.Module:
    config = get_config(folder, trust_remote_code=False)
    with set_model_tag(tag):
        return init_vllm_registered_model(vllm_config, hf_config=config, prefix=tag)


class TRBBlendForCausalLM(nn.Module):
    """See the module docstring. `policy` is the behavior the next generation samples; set it before each one."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        blend = vllm_config.model_config.hf_config.trb_blend
        self.vocab_size = blend["vocab_size"]
        self.stop_into = blend["eos_id"]
        self.register_buffer("stop_ids", torch.tensor(blend["stop_ids"], dtype=torch.long), persistent=False)
        self.teacher_folder = blend["teacher"]
        self.student = _stack(vllm_config, vllm_config.model_config.model, STUDENT)
        self.teacher = _stack(vllm_config, self.teacher_folder, TEACHER) if self.teacher_folder else None
        self.student_width = self.student.config.hidden_size
        self.policy: BehaviorPolicy = StudentPolicy()
        self._teacher_loaded = False

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.student.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states of both stacks side by side, (n, d_S + d_T); the student's alone without a
        teacher."""
        student = self.student(input_ids, positions)  # (n, d_S)
        if self.teacher is None:
            return student
        return torch.cat([student, self.teacher(input_ids, positions)], dim=-1)  # (n, d_S + d_T)

    def _logp(self, stack: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return merged_logp(stack.compute_logits(hidden), self.vocab_size, self.stop_ids, self.stop_into)  # (n, V)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """log mu on the shared vocabulary and the records: (n, V + len(EXTRAS)) fp32."""
        student = self._logp(self.student, hidden_states[:, : self.student_width])  # (n, V)
        teacher = None
        if self.teacher is not None:
            teacher = self._logp(self.teacher, hidden_states[:, self.student_width :])  # (n, V)
        mu, beta, kl = distribution(self.policy, student, teacher)  # (n, V), (n,), (n,)
        zeros = torch.zeros_like(beta)  # (n,)
        teacher_kl = kl_divergence(student, teacher) if teacher is not None else zeros  # (n,)
        teacher_entropy = entropy(teacher) if teacher is not None else zeros  # (n,)
        records = torch.stack([beta, kl, teacher_kl, teacher_entropy], dim=-1).float()  # (n, E)
        return torch.cat([mu.float(), records], dim=-1)  # (n, V + E)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Weights named as in the student's checkpoint go to the student; the teacher's are read from its folder
        on the first call only (an in-place reload of the student leaves the teacher as it is)."""
        loaded = {f"{STUDENT}.{name}" for name in self.student.load_weights(weights)}
        if self.teacher is not None and not self._teacher_loaded:
            files = sorted(str(f) for f in Path(self.teacher_folder).glob("*.safetensors"))
            loaded |= {f"{TEACHER}.{name}" for name in
                       self.teacher.load_weights(safetensors_weights_iterator(files, use_tqdm_on_load=False))}
            self._teacher_loaded = True
        return loaded
