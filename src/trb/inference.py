"""The student as rollouts and evaluation decode it: a plain model holding the full current weights.

Training may hold the student in forms the lean decoder (`trb.lean.supports`) refuses: FSDP2 shards its
layers (module hooks, DTensor parameters) and LoRA puts adapters beside its linear layers. Decoding then runs an
`InferenceCopy`: a model of the same architecture without shards, hooks or adapters, the LoRA deltas merged into
the base weights, in the decode dtype (bf16 on a GPU under bf16 autocast: a decode step reads half the bytes, and
no weight is cast at every step). Every rank holds the whole copy and decodes its share of a step with it.
`refresh` writes the training weights into it after every update; under FSDP2 it gathers one parameter at a time,
so the transient memory is one full parameter.

A student that needs none of this (one process or DDP, no adapters, already in the decode dtype) is its own copy:
nothing is stored twice and nothing is refreshed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from trb.models import lora_layers, merged_weights
from trb import lean


class InferenceCopy:
    """`model`: what decodes the student; `refresh()`: make it hold the student's current weights.

    Build it before the student is sharded (`sharded`: its parameters will be FSDP2 shards); under FSDP2 every rank
    must call `refresh` at the same point, as for any collective.
    """

    def __init__(self, student: nn.Module, dtype: torch.dtype, sharded: bool):
        self.student = student
        self._filled = False
        lora = lora_layers(student)
        if not sharded and not lora and next(student.parameters()).dtype == dtype:
            self.model = student
            return
        # A deep copy whose parameters are made directly in `dtype` (the memo stands in for them), so the student's
        # weights never exist twice in its own dtype; then each LoRA layer is replaced by its base linear layer.
        memo = {id(p): nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False) for p in student.parameters()}
        self.model = copy.deepcopy(student, memo).eval()
        for name in lora:
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, self.model.get_submodule(name).get_base_layer())
        self.refresh()

    @property
    def lean(self) -> bool:
        """Whether rollouts of this copy run the lean decoder (rather than the Hugging Face forward)."""
        return lean.supports(self.model)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the student's weights into the inference model, LoRA deltas merged. After the first refresh only what
        training can change is copied (trainable parameters, and the weights LoRA layers merge into)."""
        if self.model is self.student:
            return
        target = dict(self.model.named_parameters())
        for name, value in merged_weights(self.student, changing_only=self._filled):
            if name in target:  # tied parameters: under their first name only
                target[name].copy_(value)
        self._filled = True
