"""The training forward beside `trb.lean`: a causal LM's final hidden states at the positions a loss reads, with
the rows of a rollout batch run in groups of similar length (`FinalHidden`), and the output layer's rows of the shared
vocabulary the loss multiplies them with (`output_weight`).

Rollouts vary in length, and the padding of one rectangle costs as much compute as real tokens: rows are sorted into
groups with the least padding (`least_padding_split`), each row's tokens moved to the front (`aligned_groups`), and
only the positions that predict a completion token are returned (`completion_select`), in row-major order.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from trb import lean
from trb.core import merged_logp
from trb.divergences import LossSpec
from trb.models import VocabSpace, plain_forward
from trb.sequences import Rollout


def completion_select(rollout: Rollout) -> torch.Tensor:
    """(B, P + T) bool: the sequence positions whose next-token distribution predicts a valid completion token
    (completion token t is predicted at column P - 1 + t). Their row-major order is that of completion_mask."""
    (batch, prompt_width), steps = rollout.prompt_ids.shape, rollout.completion_mask.shape[1]
    select = torch.zeros((batch, prompt_width + steps), dtype=torch.bool, device=rollout.prompt_ids.device)
    select[:, prompt_width - 1 : prompt_width - 1 + steps] = rollout.completion_mask  # (B, P + T)
    return select


def aligned_groups(attention_mask: torch.Tensor, groups: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Rows of a padded batch in up to `groups` groups of similar length, each row's attended tokens moved to the
    front: (rows (b,), columns (b, w)) per group, where w is the group's longest row and columns[i, j] is the column
    that row i's j-th attended token comes from (past the row's length: its last column, padding that no attended
    token sees under a causal mask). None when some row's attended tokens are not contiguous.

    Rollouts are left-padded prompts followed by right-padded completions, so each row's tokens are contiguous; moved
    to the front, they need no attention mask at all (causal attention never looks past a token), and the group
    processes only its longest row's length instead of the batch's full width."""
    attended = attention_mask.bool()  # (B, L)
    width = attended.shape[1]
    columns = torch.arange(width, device=attended.device)  # (L,)
    first = torch.where(attended, columns, width).amin(1)  # (B,)
    lengths = attended.sum(1)  # (B,)
    last = torch.where(attended, columns, -1).amax(1)  # (B,)
    if bool(((last - first + 1) != lengths).any()) or bool((lengths == 0).any()):
        return None
    order = lengths.argsort(stable=True)  # (B,)
    bounds = least_padding_split(lengths[order].cpu(), groups)
    spans = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        rows = order[start:end]  # (b,)
        w = int(lengths[rows].max())
        spans.append((rows, (first[rows, None] + columns[:w]).clamp_max(last[rows, None])))  # (b, w)
    return spans


def least_padding_split(lengths: torch.Tensor, groups: int) -> list[int]:
    """Boundaries 0 = e_0 < e_1 < ... < e_k = B cutting ascending lengths (B,) into at most `groups` runs of at least
    two rows (a lone row would be a batch of one, which compiled forwards treat as a shape of its own) with the least
    padded size, sum over runs of (rows in the run) x (its longest length): dynamic programming over the end of the
    last run, O(k B^2); batches past 1,024 rows are cut into runs of equal counts instead."""
    n = len(lengths)
    least = min(2, n)  # rows per run
    k = max(1, min(groups, n // least))
    if n > 1024:
        return [n * g // k for g in range(k + 1)]
    ends = torch.arange(n + 1)
    size = ends[:, None] - ends[None, :]  # (n + 1, n + 1): rows in the run (i, j]
    longest = torch.cat([lengths.new_zeros(1), lengths]).double()  # (n + 1,): the longest row of a run ending at j
    cost = torch.full((n + 1,), float("inf"), dtype=torch.float64)  # least padded size of the first j rows
    cost[0] = 0.0
    choices = []
    for _ in range(k):
        total = torch.where(size >= least, cost[None, :] + size * longest[:, None], float("inf"))  # (n + 1, n + 1)
        cost, choice = total.min(1)
        choices.append(choice)
    bounds = [n]
    for choice in reversed(choices):
        bounds.append(int(choice[bounds[-1]]))
    return bounds[::-1]


class FinalHidden(nn.Module):
    """A causal LM's final hidden states (after the last norm). Wrapping the base model in a module of its own lets
    data-parallel wrappers see the forward that produces them; the output layer is applied in chunks by the loss.

    With `select` (a (B, L) bool mask) the forward returns only the selected positions' states, (N, d) in row-major
    order, and runs the rows in `groups` groups of similar length with each row's tokens moved to the front
    (`aligned_groups`): rollouts vary in length, and the padding of one rectangle costs as much compute as real
    tokens; aligned rows also need no attention mask. Positions are taken to count attended tokens
    (`trb.sequences.position_ids`), so no result changes. With forward "auto" or "lean" Llama-family models then run
    `trb.lean.final_hidden` (where `lean.trains` says it reproduces them), whose last layer skips the positions nobody
    reads; others (and forward "hf") the Hugging Face base model. With `compile` the forward runs through
    torch.compile (dynamic shapes)."""

    def __init__(self, model: PreTrainedModel, groups: int = 1, compile: bool = False, forward: str = "auto"):
        super().__init__()
        self.model = model
        self.groups = groups
        self.compile = compile
        self.forward_kind = forward

    def _states(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        base = compiled_base(self.model) if self.compile else self.model.base_model
        out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return out.last_hidden_state  # (b, l, d)

    def forward(self, input_ids, attention_mask, position_ids, select=None) -> torch.Tensor:
        if select is None:
            return self._states(input_ids, attention_mask, position_ids)  # (B, L, d)
        spans = aligned_groups(attention_mask, self.groups)
        if spans is None:  # tokens with gaps: one padded rectangle under the mask
            return self._states(input_ids, attention_mask, position_ids)[select]  # (N, d)
        lean_forward = None
        if self.forward_kind != "hf" and lean.trains(self.model):
            lean_forward = lean.compiled_final_hidden() if self.compile else lean.final_hidden
        flat = torch.arange(select.numel(), device=select.device).view(select.shape)  # (B, L) row-major index
        parts, where = [], []
        for rows, columns in spans:
            b, w = columns.shape
            steps = torch.arange(w, device=columns.device)  # (w,)
            ids = input_ids[rows].gather(1, columns)  # (b, w)
            chosen = select[rows].gather(1, columns) & (columns - columns[:, :1] == steps)  # (b, w)
            if lean_forward is not None:
                # every aligned row sits at positions 0 ... w - 1: one row of rotary angles serves all
                parts.append(lean_forward(self.model, ids, steps[None], chosen.flatten().nonzero()[:, 0]))
            else:
                parts.append(self._states(ids, None, steps.expand(b, w))[chosen])  # (n_g, d)
            where.append(flat[rows].gather(1, columns)[chosen])  # (n_g,)
        return torch.cat(parts)[torch.cat(where).argsort()]  # (N, d) back in row-major order


def compiled_base(model: PreTrainedModel) -> nn.Module:
    """torch.compile of the model's base (the decoder without the output layer), kept on the model: dynamic shapes,
    so one compilation serves every batch size and length. Models whose forward is not plainly their own (FSDP2
    hooks, offloading) keep the eager forward."""
    if not plain_forward(model):
        return model.base_model
    store = vars(model)  # not a registered submodule: no second copy of the weights in state_dict or parameters()
    if "_trb_compiled_base" not in store:
        store["_trb_compiled_base"] = torch.compile(model.base_model, dynamic=True)
    return store["_trb_compiled_base"]


def output_weight(model: PreTrainedModel, vocab: VocabSpace) -> torch.Tensor:
    """The output layer's weight rows of the shared vocabulary, (V, d)."""
    return model.get_output_embeddings().weight[: vocab.size]


@torch.no_grad()
def token_logp(model: PreTrainedModel, rollout: Rollout, vocab: VocabSpace,
               groups: int = LossSpec.length_groups) -> torch.Tensor:
    """Log-probs (B, T) of the completion tokens under model, through the same forward path as the loss (one pass
    over prompt + completion, final hidden states, output rows of the shared vocabulary); 0 at masked positions."""
    input_ids, attention_mask, positions = rollout.sequences()  # (B, L)
    hidden = FinalHidden(model, groups)(input_ids, attention_mask, positions, completion_select(rollout))  # (N, d)
    logits = hidden @ output_weight(model, vocab).T  # (N, V)
    logp = merged_logp(logits, vocab.size, vocab.stop_tensor(logits.device), vocab.eos_id)  # (N, V)
    out = torch.zeros(rollout.completion_ids.shape, device=logits.device)  # (B, T)
    out[rollout.completion_mask] = logp.gather(-1, rollout.completion_ids[rollout.completion_mask][:, None])[:, 0]
    return out
