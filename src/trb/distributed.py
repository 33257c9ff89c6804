"""Data parallelism through PyTorch's own stack: `torchrun --nproc_per_node N -m trb train ...`.

- Each rank decodes its share of a step's rollout batches: global batch j goes to rank j mod world, and its sampling
  generator is seeded from (seed, step, j), so the rollouts (and hence the update) do not depend on the world size.
  Ranks decode with a whole, unsharded copy of the student (`trb.inference.InferenceCopy`), never through FSDP2.
- The loss is normalized by the completion-token count of the whole step, summed over ranks.
- "ddp": DistributedDataParallel around the module that computes the student's final hidden states.
  "fsdp": FSDP2 (`fully_shard`) on every decoder layer and the root; the input embedding and output layer stay
  replicated (the chunked loss applies the output layer outside the module's forward) and their gradients are
  all-reduced by hand.
- Checkpoints hold full (unsharded) state dicts, written by rank 0, so a run resumes on any world size.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

STRATEGIES = ("ddp", "fsdp")


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def init(device_name: str) -> World:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a plain process is a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return world


def shutdown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: float, world: World, device: torch.device) -> float:
    if not world.active:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item()


def gather_objects(obj, world: World) -> list:
    if not world.active:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def replicated_params(model: nn.Module) -> list[nn.Parameter]:
    """The input embedding and output layer (one parameter when tied): applied by the loss outside any forward."""
    params = {id(p): p for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    return list(params.values())


def wrap(hidden: nn.Module, model: nn.Module, strategy: str, world: World) -> nn.Module:
    """The module whose forward gives the student's final hidden states, wrapped for data parallelism."""
    if not world.active:
        return hidden
    if strategy == "ddp":
        device_ids = [world.local_rank] if next(model.parameters()).is_cuda else None
        return nn.parallel.DistributedDataParallel(hidden, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    # The base model (embedding, layers, final norm) is the FSDP root, so the loss (which calls the base model through
    # `hidden`) enters through its hooks. Decoding runs the inference copy (trb.inference), not this model.
    for layer in model.base_model.layers:
        fully_shard(layer)
    fully_shard(model.base_model, ignored_params=set(replicated_params(model)))
    return hidden


@contextlib.contextmanager
def gradient_sync(hidden: nn.Module, model: nn.Module, strategy: str, world: World, enabled: bool):
    """Skip gradient communication on all but the last micro-batch of a step (hidden: the module `wrap` returned)."""
    if not world.active or enabled:
        yield
    elif strategy == "ddp":
        with hidden.no_sync():
            yield
    else:
        model.base_model.set_requires_gradient_sync(False, recurse=True)
        try:
            yield
        finally:
            model.base_model.set_requires_gradient_sync(True, recurse=True)


def finish_gradients(model: nn.Module, strategy: str, world: World) -> None:
    """All-reduce (average) the gradients FSDP does not manage: the replicated embedding/output layer."""
    if world.active and strategy == "fsdp":
        for param in replicated_params(model):
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= world.size


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Global gradient norm over plain and sharded (DTensor) gradients; scales them down to max_norm."""
    grads = [p.grad for p in params if p.grad is not None]
    total_sq = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else "cpu")
    for g in grads:
        square = g.detach().double().pow(2).sum()
        total_sq += square.full_tensor() if isinstance(square, DTensor) else square
    total = total_sq.sqrt().item()
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for g in grads:
            g.detach().mul_(coef)
    return total


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts keyed by parameter names (a collective under FSDP)."""
    return get_model_state_dict(model, options=FULL), get_optimizer_state_dict(model, optimizer, options=FULL)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    set_model_state_dict(model, model_state, options=FULL)
    set_optimizer_state_dict(model, optimizer, optim_state, options=FULL)
