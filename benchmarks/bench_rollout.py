"""Rollout throughput: student-only decoding, lock-step TRB decoding (student + teacher + beta solve), exact speculative
TRB (student drafts, one teacher forward per round), and Hugging Face `generate` on the same student, at several
batch sizes.

    python benchmarks/bench_rollout.py                         # CPU: tiny models (miniature-sized)
    python benchmarks/bench_rollout.py --models qwen3 --device cuda --new-tokens 256
        # GPU: random-init Qwen3-1.7B-shaped student and Qwen3-8B-shaped teacher, real vocabulary
    python benchmarks/bench_rollout.py --workload realistic [--models qwen3-scaled]
        # a step's rollouts with lengths spread like reasoning traces (see `realistic`)

Tokens/s counts generated completion tokens (all sequences) per second of wall time, after warm-up, synchronized.
The last stdout line is JSON with the device name.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit, synchronize, time_ms  # noqa: E402

from trb.models import VocabSpace, tiny_causal_lm  # noqa: E402
from trb.rollout import RolloutStats, StudentPolicy, TRBPolicy, generate  # noqa: E402


def build_models(kind: str, device: torch.device):
    if kind in ("qwen3-scaled", "qwen3-0.6b-4b"):  # Qwen3-0.6B / 4B, full size or at 1/8 width; real vocabulary
        from trb.testing import random_qwen3

        scale = 0.125 if kind == "qwen3-scaled" else 1.0
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        student = random_qwen3("0.6b", scale=scale, seed=0, device=device, dtype=dtype)
        teacher = random_qwen3("4b", scale=scale, seed=1, chat=True, device=device, dtype=dtype)
        space = VocabSpace(size=151_669, stop_ids=(151_643, 151_645), eos_id=151_643, pad_id=151_643)
        return student.eval(), teacher.eval(), space
    if kind == "tiny":
        vocab = 512
        student = tiny_causal_lm(vocab, 128, 4, num_heads=4, num_kv_heads=2, seed=0, init_std=0.1,
                                 tie_word_embeddings=False, eos_token_id=1)
        teacher = tiny_causal_lm(vocab, 256, 6, num_heads=8, num_kv_heads=4, seed=1, init_std=0.1,
                                 tie_word_embeddings=False, eos_token_id=1)
        space = VocabSpace(size=vocab, stop_ids=(1,), eos_id=1, pad_id=0)
    else:
        from trb.testing import random_qwen3

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        student = random_qwen3("1.7b", seed=0, device=device, dtype=dtype)
        teacher = random_qwen3("8b", seed=1, chat=True, device=device, dtype=dtype)
        space = VocabSpace(size=151_669, stop_ids=(151_643, 151_645), eos_id=151_643, pad_id=151_643)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return student.to(device, dtype).eval(), teacher.to(device, dtype).eval(), space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", choices=["tiny", "qwen3", "qwen3-scaled", "qwen3-0.6b-4b"], default="tiny")
    parser.add_argument("--workload", choices=["batches", "realistic"], default="batches")
    parser.add_argument("--sequences", type=int, default=256, help="realistic: sequences in the step's queue")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="realistic: the KV budget in sequences (rollout_batch: concurrency x (longest prompt + "
                             "cap) slots per model)")
    parser.add_argument("--cap", type=int, default=256, help="realistic: max new tokens (lengths' cap)")
    parser.add_argument("--policies", nargs="+", choices=["student", "trb"], default=["student", "trb"],
                        help="realistic: the behavior policies to run (the schedule's counts do not depend on it)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--eps", type=float, default=0.02)
    parser.add_argument("--gamma", type=int, default=4, help="draft length of speculative TRB")
    parser.add_argument("--compile", action="store_true", help="the policy's math through torch.compile")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    student, teacher, space = build_models(args.models, device)
    if args.workload == "realistic":
        return realistic(args, student, teacher, space, device)
    rows = []
    for batch in args.batch_sizes:
        prompt_gen = torch.Generator().manual_seed(batch)
        prompts = torch.randint(2, min(space.size, 30_000), (batch, args.prompt_tokens), generator=prompt_gen).tolist()
        counted = {}

        def ours(policy, name):
            def run():
                rollout = generate(policy, prompts, space, args.new_tokens, torch.Generator(device=device).manual_seed(0),
                                   student=student, teacher=teacher, compile=args.compile)
                counted[name] = int(rollout.completion_mask.sum())
            return run

        def hf():
            ids = torch.tensor(prompts, device=device)
            out = student.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                   do_sample=True, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=space.pad_id,
                                   eos_token_id=list(space.stop_ids))
            completion = out[:, ids.shape[1]:]
            stopped = torch.isin(completion, torch.tensor(space.stop_ids, device=device))
            ended = (stopped.cumsum(1) - stopped.long()) > 0  # tokens after the first stop are padding
            counted["hf_generate"] = int((~ended).sum())

        def speculative():
            stats = RolloutStats()
            rollout = generate(TRBPolicy(args.eps), prompts, space, args.new_tokens,
                               torch.Generator(device=device).manual_seed(0), student=student, teacher=teacher,
                               gamma=args.gamma, compile=args.compile, stats=stats)
            counted["trb_speculative"] = int(rollout.completion_mask.sum())
            counted["acceptance"] = stats.acceptance

        row = {"batch": batch}
        for name, fn in (("student", ours(StudentPolicy(), "student")), ("trb_lockstep", ours(TRBPolicy(args.eps),
                         "trb_lockstep")), ("trb_speculative", speculative), ("hf_generate", hf)):
            with torch.no_grad():
                ms = time_ms(fn, device, warmup=1, repeats=args.repeats)
            row[f"{name}_tokens_per_s"] = round(counted[name] / (ms / 1e3), 1)
            row[f"{name}_ms"] = round(ms, 1)
        row["speculative_acceptance"] = round(counted["acceptance"], 4)
        row["speculative_over_lockstep_time"] = round(row["trb_speculative_ms"] / row["trb_lockstep_ms"], 3)
        rows.append(row)
        synchronize(device)
        print(row, file=sys.stderr)
    emit({"benchmark": "rollout", "device": device_name(device), "torch": torch.__version__, "models": args.models,
          "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "compile": args.compile, "eps": args.eps,
          "rows": rows})


class ScriptedLengths:
    """A behavior policy that ends sequence k (its key) after lengths[k] tokens: the workload's lengths without
    depending on when random-init models happen to emit EOS (it is removed from both distributions before the
    wrapped policy draws, unless forbid_stop=False: then the lengths are caps, as a server's per-request max_tokens).
    Everything else is the wrapped policy's."""

    speculative = False

    def __init__(self, policy, lengths: torch.Tensor, eos_id: int, forbid_stop: bool = True):
        self.policy, self.lengths, self.eos_id, self.forbid_stop = policy, lengths, eos_id, forbid_stop
        self.name, self.needs_student, self.needs_teacher = policy.name, policy.needs_student, policy.needs_teacher

    def _no_stop(self, logp):
        if not self.forbid_stop:
            return logp
        return None if logp is None else logp.index_fill(-1, torch.tensor([self.eos_id], device=logp.device),
                                                         float("-inf")).log_softmax(-1)

    def distribution(self, student_logp, teacher_logp):
        return self.policy.distribution(self._no_stop(student_logp), self._no_stop(teacher_logp))

    def choose(self, student_logp, teacher_logp, draws):
        choice = self.policy.choose(self._no_stop(student_logp), self._no_stop(teacher_logp), draws)
        end = draws.positions + 1 >= self.lengths.to(draws.keys.device)[draws.keys]  # (b,)
        choice.token = torch.where(end, self.eos_id, choice.token)
        return choice


def trace_lengths(count: int, cap: int, seed: int = 0) -> torch.Tensor:
    """Response lengths like reasoning traces: log-normal (sigma 1) with mean ~cap / 4 before clipping, at least 8
    tokens, clipped at the cap (a tail that reaches it)."""
    normal = torch.randn(count, generator=torch.Generator().manual_seed(seed))
    return (torch.exp(normal - 0.5) * cap / 4).round().long().clamp(8, cap)


def realistic(args, student, teacher, space, device) -> None:
    """One step's rollouts: `sequences` prompts in a queue, a KV budget of `concurrency` dense rows per model
    (concurrency x (longest prompt + cap) slots, the engine's `rollout_batch`), lengths from `trace_lengths`.
    Reports tokens/s (wall and process CPU time) and the counts that set GPU speed: decode steps relative to the
    ideal (total tokens / concurrency) and to the floor no schedule of the queue can beat, max(ideal, longest
    sequence - 1) (`steps_over_floor`), the most KV slots held at once beside the budget, rows decoding at once,
    preemptions, and KV slots attention read relative to the slots filled; for this engine (admission by KV memory,
    paged KV) and for decoding the same queue in fixed batches of `concurrency` over left-padded dense caches (every
    row reads the batch's full width; the previous engine's scheme)."""
    lengths = trace_lengths(args.sequences, args.cap)
    prompt_gen = torch.Generator().manual_seed(1)
    prompt_lengths = torch.randint(args.prompt_tokens // 2, args.prompt_tokens + 1, (args.sequences,), generator=prompt_gen)
    prompts = [torch.randint(2, 30_000 if space.size > 30_000 else space.size, (int(n),), generator=prompt_gen).tolist()
               for n in prompt_lengths]
    keys = torch.arange(args.sequences)
    tokens = int(lengths.sum())
    out = {"benchmark": "rollout_realistic", "device": device_name(device), "torch": torch.__version__,
           "models": args.models, "sequences": args.sequences, "concurrency": args.concurrency, "cap": args.cap,
           "tokens": tokens, "mean_length": round(tokens / args.sequences, 1), "max_length": int(lengths.max()),
           "prompt_tokens": [int(prompt_lengths.min()), int(prompt_lengths.max())],
           # no schedule of one step's queue ends before its longest sequence (length - 1 decode steps after the
           # prompt pass): the smallest steps_over_ideal any engine can reach on this workload
           "floor_over_ideal": round(max(1.0, (int(lengths.max()) - 1) * args.concurrency / tokens), 3),
           "kv_budget_slots": args.concurrency * (int(prompt_lengths.max()) + args.cap), "policies": {}}
    floor = max(tokens / args.concurrency, int(lengths.max()) - 1)  # decode steps
    # fixed batches over dense caches, counted from the lengths: each batch decodes until its longest row ends, every
    # row present reading the batch's widest prompt plus the step (finished rows leave)
    steps = read = filled = 0
    for start in range(0, args.sequences, args.concurrency):
        batch = lengths[start : start + args.concurrency]
        width = int(prompt_lengths[start : start + args.concurrency].max())
        for t in range(1, int(batch.max())):
            alive = batch > t
            steps += 1
            read += int(alive.sum()) * (width + t)
            filled += int((prompt_lengths[start : start + args.concurrency][alive] + t).sum())
    out["fixed_batches"] = {"steps_over_ideal": round(steps * args.concurrency / tokens, 3),
                            "steps_over_floor": round(steps / floor, 3),
                            "reads_over_filled": round(read / max(filled, 1), 3)}
    policies = {"student": StudentPolicy(), "trb": TRBPolicy(args.eps)}
    for name in args.policies:
        stats = RolloutStats()
        scripted = ScriptedLengths(policies[name], lengths, space.eos_id)
        started, used = time.perf_counter(), time.process_time()
        rollout = generate(scripted, prompts, space, args.cap, student=student, teacher=teacher, keys=keys,
                           batch=args.concurrency, compile=args.compile, stats=stats)
        synchronize(device)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - used
        assert torch.equal(rollout.lengths.cpu(), lengths), "the workload's lengths were not followed"
        out["policies"][name] = {
            "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "decode_steps": stats.decode_steps,
            "prompt_passes": stats.prompt_passes, "steps_over_ideal": round(stats.steps_over_ideal, 3),
            "steps_over_floor": round(stats.decode_steps / floor, 3),
            "peak_kv_slots": stats.peak_slots, "rows": stats.rows, "preemptions": stats.preemptions,
            "reads_over_filled": {role: round(r.ratio, 3) for role, r in stats.reads.items()}}
        print(name, out["policies"][name], file=sys.stderr)
    emit(out)


if __name__ == "__main__":
    main()
