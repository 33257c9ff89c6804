"""Putting two models' next-token distributions on one space (METHOD.md section 2).

Checkpoints may pad the vocabulary to different sizes: both are sliced to the shared real vocabulary before any KL
or blend. A base student and a chat teacher may end sequences with different EOS ids: all EOS ids are merged into
one stop event carried by the student's EOS id, so blending and comparing happen on the merged space and sampling
the stop event emits the student's EOS.
"""

from __future__ import annotations

import torch


def merged_logp(logits: torch.Tensor, vocab_size: int, stop_ids: torch.Tensor, stop_into: int) -> torch.Tensor:
    """log-probabilities (..., vocab_size) fp32 on the shared, stop-merged space.

    logits: (..., V_model) with V_model >= vocab_size; stop_ids: (n_stop,) int64 ids that end a sequence for
    either model; stop_into: the id that carries the merged stop event (the student's EOS). The other stop ids
    get probability 0 (-inf). With a single stop id this is log_softmax of the sliced logits.
    """
    logp = torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)  # (..., V)
    if stop_ids.numel() <= 1:
        return logp
    stop_logp = torch.logsumexp(logp.index_select(-1, stop_ids), dim=-1)  # (...)
    logp = logp.index_fill(-1, stop_ids, float("-inf"))  # (..., V)
    is_into = torch.arange(logp.shape[-1], device=logp.device) == stop_into  # (V,) no host-to-device copy
    return torch.where(is_into, stop_logp[..., None], logp)
