"""The decoder interface: one model's incremental decoding over a dense batch of sequences in progress.

The engine (`trb.rollout.engine`) and speculative TRB (`trb.rollout.speculative`) drive every model through these
five operations and nothing else, so a model family needs one backend (`trb.rollout.backends`) to decode at speed:

- `add(prompts)` appends rows for new sequences (a prompt pass) and returns their next-token log-probs;
- `step(tokens)` feeds w tokens to every row and returns the log-probs after each of them;
- `keep(rows)` keeps these rows, in this order (finished sequences leave; free rows are refilled by `add`);
- `truncate(drop)` forgets the last drop[r] tokens of row r (drafts that speculative sampling rejected);
- `reads` counts KV slots attention read and slots that were filled (the benchmark's measure of wasted reads).

Log-probabilities are on the shared vocabulary (`trb.models.VocabSpace`): sliced to the real vocabulary, every stop
id merged into the student's EOS, temperature 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Reads:
    """KV slots read by attention and slots filled (real tokens in the cache), summed over decode steps and layers'
    worth of one layer: their ratio is the share of attention work spent on padding."""

    read: int = 0
    filled: int = 0

    @property
    def ratio(self) -> float:
        return self.read / max(self.filled, 1)


class Decoder(Protocol):
    reads: Reads

    @property
    def rows(self) -> int: ...

    def add(self, prompts: list[list[int]]) -> torch.Tensor:
        """Append one row per prompt; returns the next-token log-probs after each prompt, (n, V)."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens (b, w) to the b rows; returns the log-probs after each of them, (b, w, V)."""

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows (b',) int64, in this order."""

    def truncate(self, drop: torch.Tensor) -> None:
        """Forget the last drop[r] fed tokens of each row r; drop (b,) int64 >= 0."""
