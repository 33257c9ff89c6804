"""Lock-step decoding: student and teacher advance one token at a time over the same sequences.

TRB needs the teacher's next-token distribution at every step of the student's rollout, so both models decode every
token, each through its own decoder, and the behavior policy chooses from their two distributions. The queue
(`trb.rollout.queue`) admits sequences as KV memory allows and retires finished ones; a step is the policy's choice,
its records, and one forward of each model over the rows still decoding. The one host synchronization per step is
the stop check (`Queue.retire`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trb.rollout.policies import Choice, Draws
from trb.rollout.queue import Queue, model_records

Choose = Callable[[torch.Tensor | None, torch.Tensor | None, Draws], Choice]


def decode_lockstep(queue: Queue, choose: Choose, greedy: bool = False) -> None:
    """Decode every sequence of the queue to its stop or to max_new_tokens. The rows' next-token log-probs live in
    `queue.state` under each role's name, (b, V)."""
    while _refill(queue):
        _decode_step(queue, choose, greedy)


def _refill(queue: Queue) -> bool:
    """Admit waiting sequences (their prompt pass gives their next-token log-probs); False once every sequence has
    finished."""
    joined = queue.admit(grow=1, held_back=0)
    if joined is not None:
        queue.join(**joined[1])
    return queue.rows > 0


def _decode_step(queue: Queue, choose: Choose, greedy: bool) -> None:
    logp = {role: queue.state[role] for role in queue.decoders}  # each (b, V)
    choice = choose(logp.get("student"), logp.get("teacher"), queue.draws(greedy))
    queue.emit(_records(queue, choice, logp))
    _advance(queue, choice.token)


def _advance(queue: Queue, token: torch.Tensor) -> None:
    """Finished rows leave, rows the budget cannot grow by one slot are preempted, and the others are fed their
    token (b,): their next-token log-probs replace the state's."""
    queue.state["token"] = token
    queue.retire()
    queue.make_room(grow=1)
    token = queue.state.pop("token")  # (b,) the rows kept
    if queue.rows:
        logp = queue.feed(token[:, None])  # each (b, 1, V)
        queue.state.update({role: value[:, 0] for role, value in logp.items()})


def _records(queue: Queue, choice: Choice, logp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a step writes per row, each (b, 1): the token, the policy's record and the models' (with the student's
    top-k and the teacher's log-probs there when the queue records them)."""
    values = {"token": choice.token, "behavior_logp": choice.behavior_logp, "beta": choice.beta,
              "realized_kl": choice.kl, "from_teacher": choice.from_teacher,
              **model_records(logp, choice.token, queue.record_kl)}
    if queue.topk:
        ids = logp["student"].topk(queue.topk, dim=-1).indices  # (b, k)
        values.update(student_topk=ids, teacher_topk=logp["teacher"].gather(-1, ids))
    return {name: value[:, None] for name, value in values.items()}
